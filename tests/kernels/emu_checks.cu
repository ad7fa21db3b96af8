// Kernels that exercise the host emulation (kernels/emu/cuda_emu.h) and the
// helpers of common.cuh; tests/test_cuda_emulator.py checks their results
// against NumPy models of CUDA's semantics.
#include "common.cuh"

// Every thread writes its global id to shared memory; after the barrier it
// reads the value of the thread mirrored in the block. Indices in 3-D.
extern "C" __global__ void mirror(int* out) {
  __shared__ int buf[1024];
  const int nt = blockDim.x * blockDim.y * blockDim.z;
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  buf[tid] = bid * nt + tid;
  __syncthreads();
  out[bid * nt + tid] = buf[nt - 1 - tid];
}
FASTREG_EMU_LAUNCHER(mirror)

// Threads with an odd index return at once; the even ones meet at barriers
// (arrive-and-drop) and exchange values.
extern "C" __global__ void early_exit(int* out) {
  __shared__ int buf[1024];
  const int t = threadIdx.x;
  if (t & 1) return;
  buf[t] = 10 * t;
  __syncthreads();
  const int partner = (t + 2) % blockDim.x;
  const int v = buf[partner];
  __syncthreads();
  buf[t] = v + 1;
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = buf[t];
}
FASTREG_EMU_LAUNCHER(early_exit)

// The four shuffles at a given width and offset, and the votes.
extern "C" __global__ void shuffles(const float* in, float* out, unsigned* votes, int width,
                                    int offset) {
  const int t = threadIdx.x;
  const float v = in[t];
  const int n = blockDim.x;
  out[0 * n + t] = __shfl_xor_sync(0xffffffffu, v, offset, width);
  out[1 * n + t] = __shfl_down_sync(0xffffffffu, v, offset, width);
  out[2 * n + t] = __shfl_up_sync(0xffffffffu, v, offset, width);
  out[3 * n + t] = __shfl_sync(0xffffffffu, v, offset, width);
  const int pred = v > 0.0f;
  votes[3 * t + 0] = __ballot_sync(0xffffffffu, pred);
  votes[3 * t + 1] = __all_sync(0xffffffffu, pred);
  votes[3 * t + 2] = __any_sync(0xffffffffu, pred);
}
FASTREG_EMU_LAUNCHER(shuffles)

// Dynamic shared memory: thread t fills slot t, reads slot (t + 1) after the
// barrier; slot blockDim.x was never written and holds the poison pattern.
extern "C" __global__ void dynamic_shared(float* out) {
  FASTREG_DYNAMIC_SHARED(float, buf);
  const int t = threadIdx.x;
  buf[t] = float(blockIdx.x * 1000 + t);
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = buf[t + 1];
}
FASTREG_EMU_LAUNCHER(dynamic_shared)

// A read of another thread's shared value without a barrier: correct only when
// the writer happens to run first, which the emulation arranges for one block
// parity and not the other.
extern "C" __global__ void missing_barrier(float* out) {
  __shared__ float buf[64];
  const int t = threadIdx.x;
  buf[t] = float(100 * blockIdx.x + t);
  out[blockIdx.x * blockDim.x + t] = buf[(t + 1) % blockDim.x];
}
FASTREG_EMU_LAUNCHER(missing_barrier)

// Lanes 0-15 of warp 0 wait in a warp collective, the others in __syncthreads.
extern "C" __global__ void divergent_barrier(float* out) {
  if (threadIdx.x < 16) {
    __syncwarp();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}
FASTREG_EMU_LAUNCHER(divergent_barrier)

// A collective whose mask names half of a full warp.
extern "C" __global__ void half_mask(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, float(threadIdx.x), 1);
}
FASTREG_EMU_LAUNCHER(half_mask)

// float -> __half / __nv_bfloat16 -> float, element-wise.
extern "C" __global__ void convert(const float* in, float* via_half, float* via_bf16,
                                   unsigned short* half_bits, unsigned short* bf16_bits, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const __half h = __float2half_rn(in[i]);
  const __nv_bfloat16 b = __float2bfloat16_rn(in[i]);
  half_bits[i] = __half_as_ushort(h);
  bf16_bits[i] = __bfloat16_as_ushort(b);
  via_half[i] = __half2float(h);
  via_bf16[i] = __bfloat162float(b);
}
FASTREG_EMU_LAUNCHER(convert)

// common.cuh: group sums over rows of R threads, and the block's Welford state.
extern "C" __global__ void group_sums(const float* in, float* out, int R) {
  __shared__ float scratch[32];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v[1] = {in[i]};
  fastreg::group_sum(v, R, scratch);
  out[i] = v[0];
}
FASTREG_EMU_LAUNCHER(group_sums)

extern "C" __global__ void block_moments(const double* in, double* out, int per_thread) {
  __shared__ double scratch[3 * 32];
  const double* p = in + (long long)(blockIdx.x * blockDim.x + threadIdx.x) * per_thread;
  fastreg::Welford<double> w = {0.0, 0.0, 0.0};
  for (int j = 0; j < per_thread; ++j) {
    fastreg::Welford<double> one = {1.0, p[j], 0.0};
    w = fastreg::welford_merge(w, one);
  }
  w = fastreg::block_welford(w, scratch);
  double* o = out + 3 * (blockIdx.x * blockDim.x + threadIdx.x);
  o[0] = w.n;
  o[1] = w.mean;
  o[2] = w.m2;
}
FASTREG_EMU_LAUNCHER(block_moments)

// 16-byte vectors: load N values, store them times 1.1 (rounded on the way back).
template <typename T>
__device__ __forceinline__ void vec_roundtrip(const T* in, T* out) {
  typedef typename fastreg::Acc<T>::type A;
  const int N = fastreg::Vec<T>::N;
  A v[N];
  fastreg::load_vec(in + threadIdx.x * N, v);
  for (int i = 0; i < N; ++i) v[i] = v[i] * A(1.1);
  fastreg::store_vec(out + threadIdx.x * N, v);
}
extern "C" __global__ void vec_f16(const __half* in, __half* out) { vec_roundtrip(in, out); }
FASTREG_EMU_LAUNCHER(vec_f16)
extern "C" __global__ void vec_bf16(const __nv_bfloat16* in, __nv_bfloat16* out) {
  vec_roundtrip(in, out);
}
FASTREG_EMU_LAUNCHER(vec_bf16)
extern "C" __global__ void vec_f32(const float* in, float* out) { vec_roundtrip(in, out); }
FASTREG_EMU_LAUNCHER(vec_f32)
extern "C" __global__ void vec_f64(const double* in, double* out) { vec_roundtrip(in, out); }
FASTREG_EMU_LAUNCHER(vec_f64)

// Argument kinds for the signature check.
extern "C" __global__ void signature_probe(const float* p, int i, long long l, float f, double d,
                                           unsigned u, unsigned long long ul) {}
FASTREG_EMU_LAUNCHER(signature_probe)
