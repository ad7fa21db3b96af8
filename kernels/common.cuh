// Device helpers shared by the kernel families: type conversion, 16-byte
// vector loads and stores, warp and row-group reductions in a fixed order,
// the Chan/Welford merge, and the instance macro.
//
// The loader (fastreg/cuda/_source.py) inlines this file into each family's
// source string, so CuPy's cache key covers it. The same text compiles
// three ways: NVRTC through CuPy, nvcc in the compile checks, and g++ under
// the host emulation (kernels/emu/cuda_emu.h, which defines FASTREG_EMULATOR).
// Hence: no standard headers here, no implicit warp-synchronous code (every
// exchange between lanes goes through a *_sync intrinsic), and reductions
// whose order depends on the shape and the launch geometry only.
#pragma once

#ifndef FASTREG_EMULATOR
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FASTREG_EMU_LAUNCHER(name)
#endif

// An extern "C" kernel: its symbol is its plain name on every CuPy version
// (no name_expressions, whose disk cache missed for some templates), and under
// the emulator a ctypes launcher fastreg_launch_<name> comes with it.
// The bounds give the register budget: 65536 / max_threads per thread. The
// explicit minimum of one block per SM matters: without it ptxas (CUDA 13)
// squeezed small kernels to 32 registers and spilled.
#define FASTREG_KERNEL(name, max_threads, params, call)                            \
  extern "C" __global__ void __launch_bounds__(max_threads, 1) name params { call; } \
  FASTREG_EMU_LAUNCHER(name)

// Dynamic shared memory as an array of `type` (16-byte aligned).
#ifdef FASTREG_EMULATOR
#define FASTREG_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(::fastreg_emu::dynamic_shared())
#else
#define FASTREG_DYNAMIC_SHARED(type, name)             \
  extern __shared__ __align__(16) unsigned char name##_raw[]; \
  type* name = reinterpret_cast<type*>(name##_raw)
#endif

namespace fastreg {

enum : unsigned { kFullMask = 0xffffffffu };  // an enum: no storage in device memory

// ------------------------------------------------------------------ types
// Accumulation type: float for half, bfloat16 and float; double for double.
template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Rounding to the storage type: round to nearest even.
template <typename T> struct Store;
template <> struct Store<float> {
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <> struct Store<double> {
  static __device__ __forceinline__ double from(double v) { return v; }
};
template <> struct Store<__half> {
  static __device__ __forceinline__ __half from(float v) { return __float2half_rn(v); }
};
template <> struct Store<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <typename T, typename A>
__device__ __forceinline__ T from_acc(A v) { return Store<T>::from(v); }

__device__ __forceinline__ float rsqrt_acc(float v) { return rsqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return rsqrt(v); }

// ------------------------------------------------------------------ 16-byte vectors
// Vec<T>::N elements of T per 16 bytes, unpacked to / packed from the
// accumulation type with register moves only (no local memory).
template <typename T> struct Vec;
template <> struct Vec<float> {
  enum { N = 4 };
  static __device__ __forceinline__ void unpack(uint4 r, float* v) {
    v[0] = __uint_as_float(r.x); v[1] = __uint_as_float(r.y);
    v[2] = __uint_as_float(r.z); v[3] = __uint_as_float(r.w);
  }
  static __device__ __forceinline__ uint4 pack(const float* v) {
    uint4 r;
    r.x = __float_as_uint(v[0]); r.y = __float_as_uint(v[1]);
    r.z = __float_as_uint(v[2]); r.w = __float_as_uint(v[3]);
    return r;
  }
};
template <> struct Vec<double> {
  enum { N = 2 };
  static __device__ __forceinline__ void unpack(uint4 r, double* v) {
    v[0] = __hiloint2double(int(r.y), int(r.x));
    v[1] = __hiloint2double(int(r.w), int(r.z));
  }
  static __device__ __forceinline__ uint4 pack(const double* v) {
    uint4 r;
    r.x = unsigned(__double2loint(v[0])); r.y = unsigned(__double2hiint(v[0]));
    r.z = unsigned(__double2loint(v[1])); r.w = unsigned(__double2hiint(v[1]));
    return r;
  }
};
// Two 16-bit values per 32-bit word, the lower address in the low half.
template <typename H> struct Vec16 {
  enum { N = 8 };
  static __device__ __forceinline__ float lo(unsigned w);
  static __device__ __forceinline__ float hi(unsigned w);
  static __device__ __forceinline__ unsigned two(float a, float b);
  static __device__ __forceinline__ void unpack(uint4 r, float* v) {
    v[0] = lo(r.x); v[1] = hi(r.x); v[2] = lo(r.y); v[3] = hi(r.y);
    v[4] = lo(r.z); v[5] = hi(r.z); v[6] = lo(r.w); v[7] = hi(r.w);
  }
  static __device__ __forceinline__ uint4 pack(const float* v) {
    uint4 r;
    r.x = two(v[0], v[1]); r.y = two(v[2], v[3]); r.z = two(v[4], v[5]); r.w = two(v[6], v[7]);
    return r;
  }
};
template <> __device__ __forceinline__ float Vec16<__half>::lo(unsigned w) {
  return __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
}
template <> __device__ __forceinline__ float Vec16<__half>::hi(unsigned w) {
  return __half2float(__ushort_as_half((unsigned short)(w >> 16)));
}
template <> __device__ __forceinline__ unsigned Vec16<__half>::two(float a, float b) {
  return unsigned(__half_as_ushort(__float2half_rn(a))) |
         (unsigned(__half_as_ushort(__float2half_rn(b))) << 16);
}
template <> __device__ __forceinline__ float Vec16<__nv_bfloat16>::lo(unsigned w) {
  return __uint_as_float(w << 16);
}
template <> __device__ __forceinline__ float Vec16<__nv_bfloat16>::hi(unsigned w) {
  return __uint_as_float(w & 0xffff0000u);
}
template <> __device__ __forceinline__ unsigned Vec16<__nv_bfloat16>::two(float a, float b) {
  return unsigned(__bfloat16_as_ushort(__float2bfloat16_rn(a))) |
         (unsigned(__bfloat16_as_ushort(__float2bfloat16_rn(b))) << 16);
}
template <> struct Vec<__half> : Vec16<__half> {};
template <> struct Vec<__nv_bfloat16> : Vec16<__nv_bfloat16> {};

// p must be 16-byte aligned.
template <typename T, typename A>
__device__ __forceinline__ void load_vec(const T* p, A* v) {
  Vec<T>::unpack(*reinterpret_cast<const uint4*>(p), v);
}
template <typename T, typename A>
__device__ __forceinline__ void store_vec(T* p, const A* v) {
  *reinterpret_cast<uint4*>(p) = Vec<T>::pack(v);
}
// The same with evict-first hints (ld.global.cs / st.global.cs), for the last
// read of an input and for outputs: they leave L2 to the data still to be re-read.
template <typename T, typename A>
__device__ __forceinline__ void load_vec_last(const T* p, A* v) {
  Vec<T>::unpack(__ldcs(reinterpret_cast<const uint4*>(p)), v);
}
template <typename T, typename A>
__device__ __forceinline__ void store_vec_last(T* p, const A* v) {
  __stcs(reinterpret_cast<uint4*>(p), Vec<T>::pack(v));
}

// ------------------------------------------------------------------ reductions
// Butterfly sum over the warp: every lane ends with the same bits (IEEE
// addition is commutative, and each level adds the same two partial sums).
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sums of NV values over a row group: the R consecutive threads of the block
// starting at a multiple of R (R a power of two, 32 <= R <= blockDim.x).
// Order: warp butterflies, then the group's warp totals added in warp order,
// by every thread of the group (all get the same bits).
// scratch holds NV * blockDim.x / 32 values; every thread of the block must
// call this (it may contain __syncthreads), and scratch must not be written
// again before the next __syncthreads (callers alternate two buffers).
template <int NV, typename A>
__device__ __forceinline__ void group_sum(A (&v)[NV], int R, A* scratch) {
#pragma unroll
  for (int i = 0; i < NV; ++i) v[i] = warp_sum(v[i]);
  if (R > 32) {
    const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    if ((threadIdx.x & 31) == 0) {
#pragma unroll
      for (int i = 0; i < NV; ++i) scratch[i * nwarps + warp] = v[i];
    }
    __syncthreads();
    const int first = warp & ~((R >> 5) - 1);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      A s = scratch[i * nwarps + first];
      for (int k = 1; k < (R >> 5); ++k) s += scratch[i * nwarps + first + k];
      v[i] = s;
    }
  }
}

// Count, mean and sum of squared deviations of a set (Chan et al., 1979).
template <typename A> struct Welford {
  A n, mean, m2;
};

// The merge is symmetric in its arguments (bit for bit), so butterflies give
// every lane the same result: mean = (na*ma + nb*mb) / n,
// m2 = m2a + m2b + d*d * (na*nb / n) with d = mb - ma.
template <typename A>
__device__ __forceinline__ Welford<A> welford_merge(Welford<A> a, Welford<A> b) {
  const A n = a.n + b.n;
  if (n == A(0)) return a;
  const A d = b.mean - a.mean;
  Welford<A> r;
  r.n = n;
  r.mean = (a.n * a.mean + b.n * b.mean) / n;
  r.m2 = (a.m2 + b.m2) + d * d * (a.n * b.n / n);
  return r;
}

template <typename A>
__device__ __forceinline__ Welford<A> warp_welford(Welford<A> w) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    Welford<A> o;
    o.n = __shfl_xor_sync(kFullMask, w.n, offset);
    o.mean = __shfl_xor_sync(kFullMask, w.mean, offset);
    o.m2 = __shfl_xor_sync(kFullMask, w.m2, offset);
    w = welford_merge(w, o);
  }
  return w;
}

// Welford state of the whole block (every thread gets it): warp butterflies,
// then the warps' states merged in warp order. scratch: 3 * blockDim.x / 32.
template <typename A>
__device__ __forceinline__ Welford<A> block_welford(Welford<A> w, A* scratch) {
  w = warp_welford(w);
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (nwarps == 1) return w;
  if ((threadIdx.x & 31) == 0) {
    scratch[warp] = w.n;
    scratch[nwarps + warp] = w.mean;
    scratch[2 * nwarps + warp] = w.m2;
  }
  __syncthreads();
  Welford<A> r;
  r.n = scratch[0];
  r.mean = scratch[nwarps];
  r.m2 = scratch[2 * nwarps];
  for (int k = 1; k < nwarps; ++k) {
    Welford<A> o;
    o.n = scratch[k];
    o.mean = scratch[nwarps + k];
    o.m2 = scratch[2 * nwarps + k];
    r = welford_merge(r, o);
  }
  return r;
}

// ------------------------------------------------------------------ partial sums
// out[c] = sum over g in [0, G) of part[g * D + c], in increasing g: the
// second pass of the parameter gradients (one thread per column, no atomics).
template <typename T, typename A>
__device__ __forceinline__ void sum_partials(const A* __restrict__ part, int G, int D,
                                             T* __restrict__ out) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= D) return;
  A s = A(0);
  for (int g = 0; g < G; ++g) s += part[(long long)g * D + c];
  out[c] = from_acc<T>(s);
}

}  // namespace fastreg
