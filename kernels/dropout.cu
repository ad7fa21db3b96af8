// The random and dropout families: stream draws, dropout (1-bit or 0-byte
// masks), Gaussian noise and dropout, DropConnect (per batch and per
// example), DropConnect's moment-matching inference, and the fused
// dropout + residual add + layer norm, forward and backward.
//
// Every random number comes from the Philox4x32-10 stream of philox.cuh:
// element e of a call (the C-order index of the logical tensor) takes word
// e % 4 of block offset + e / 4. A thread always computes whole blocks for
// the elements it owns, so the bits never depend on the launch geometry
// (tests/test_cuda_dropout.py runs the elementwise kernels and the fused op
// under several).
//
//   dropout          y = x * m,  m = keep ? scale : 0  (a dropped Inf/NaN gives NaN)
//   dropout bwd      dx = dy * m (m from the mask bits, or the stream again)
//   gaussian         y = x + std * z   or   y = x * (1 + std * z)   (double, rounded once)
//   drop_connect     y[s, o] = scale * sum_i keep(s, o, i) * w[o, i] * x[s, i] + b[o]
//                    (per example: stream element (s * O + o) * K + i)
//   moment matching  y[r] = mean_k act(mean[r] + sqrt(var[r]) * z[r * S + k])
//   fused LN         s = x * m + residual,  y = (s - mean) * rstd * w + b
//                    ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dres_in, g = dy * w
//                    dresidual = ds,  dx = ds * m,  dw = sum dy * xhat,  db = sum dy
//
// T is the storage type (__half, __nv_bfloat16, float, double); A = Acc<T>
// (float, or double for double) the compute type. Rounding: dropout and the
// fused residual sum round as the CPU and the reference do, operation by
// operation in the dtype (scale rounded to the dtype on the host; 16-bit
// values multiply and add in float32, which is exact for the product and
// correctly rounded after the second rounding, then round to the dtype;
// __fmul_rn / __fadd_rn keep float and double from contracting x * m + r
// into one FMA). So y of dropout and s of the fused op equal the CPU's and
// the reference's bit for bit (CuPy's -ftz=true aside: float32 denormals
// flush on the GPU). Noise, moment matching and the normalization use
// ordinary arithmetic (agreement within tolerances).
//
// Mask bits ("bits"): uint32 words, element e is bit e % 32 of word e / 32,
// padding 0. An elementwise thread owns a unit of 8 consecutive elements (2
// Philox blocks, one 16-byte vector of 16-bit data, two of float, four of
// double), so a warp covers 256 elements = 8 words. Its 8 keep bits go
// through 8 __ballot_sync (bit l of ballot j = element 8 l + j of the warp's
// range) and lane q < 8 gathers word q from bits 4q .. 4q+3 of each ballot:
// one plain 4-byte store per word, no atomics, no read-modify-write.
// The backward reads the thread's byte of the mask (byte u = units' bits).
//
// Strategies, bytes (minimal: inputs read once, outputs written once) and
// the bound each kernel should reach on an H100 (HBM3: a copy ceiling near
// 3 TB/s read + written; none of this has been timed on a GPU yet:
// bench/gpu_check.py measures it):
// - dropout_fwd: grid-stride over warps of 256 elements. Reads x, writes y
//   and n/8 bytes of bits: 8.125 bytes per float32 element (16M: 136 MB,
//   ~45 us at 3 TB/s; the issue's bar is 2700 GB/s, PyTorch's 1-byte mask
//   reaches 2243). About 15 integer instructions per element for Philox:
//   memory-bound on an H100 (it issues ~30 T thread-instructions/s against
//   ~330 G elements/s at 2.7 TB/s of float32). "seed" masks write no bits.
// - dropout_bwd_bits: reads dy and n/8 bytes, writes dx; the "seed"
//   backward is dropout_fwd on dy (reads dy, writes dx, Philox again).
// - gaussian: Box-Muller in double (log, sqrt, sincospi per pair, ~35
//   float64 operations per element): reads x, writes y. On an H100 (~34
//   TFLOP/s of float64) memory-bound for float32/float64 data and near the
//   float64 limit for 16-bit data; compute-bound on GPUs with slow float64.
// - stream_fill (random_bits / uniform / normal): writes the output only.
// - drop_connect per batch: dropout_fwd over the weight (reads W, writes the
//   masked W: the one pass the issue asks for), then cuBLAS through CuPy's
//   matmul (NumPy's under the emulation; 16-bit operands go to the GEMM as
//   float32 copies). Backward: the same pass over W, two GEMMs, and
//   dropout_fwd over the weight gradient.
// - drop_connect_examples_fwd: a tiled product, 16 samples x 16 outputs per
//   256-thread block, K walked in tiles of 32 staged in shared memory; each
//   thread walks the Philox blocks of its (s, o) row of the mask tile:
//   N * O * K / 4 blocks in all (compute-bound: ~15 instructions per
//   multiply-add), x read O / 16 times and W N / 16 times (from L2).
// - drop_connect_examples_bwd: out[a, i] = sum_b dy[row] keep(row * K + i)
//   mat[b, i] with row = a * ra + b * rb (dx: a = s, b = o, mat = W;
//   dW: a = o, b = s, mat = x); 16 a x 64 i per block, b in tiles of 16;
//   each thread owns 4 consecutive i, whose 4 stream elements span 1 or 2
//   Philox blocks (up to 2x the blocks of the forward when K % 4 != 0).
// - moment_matching: one thread per output, its S normals one stream range.
// - dropout_add_ln_fwd (register path): a row group of R threads (a power
//   of two, 32..1024) owns a row; thread t holds K slots of N = 16 / sizeof(T)
//   consecutive columns (k R + t) N .. + N - 1, whose N stream elements
//   span at most (N + 6) / 4 Philox blocks (N / 4, or 1 for float64, when
//   D % N == 0); 16-byte loads where rows and pointers are aligned, scalar
//   loads of the same columns otherwise. Reads x, residual
//   (+ w, b), writes y, s (+ mean, rstd): 4 passes where the unfused ops
//   make 7 (16 bytes per float32 element; the issue's bar is 2.5x PyTorch's
//   eager dropout + add + layer_norm, ~1000 GB/s effective). Mean first,
//   then the centred sums of s - mean and its square from the registers
//   (corrected two-pass for float accumulators: exact at any offset).
//   With "bits" the block also writes the mask words whose first element
//   lies in its rows, from a second Philox pass over them (+ n/8 bytes;
//   Philox runs twice per element in that mode, once in "seed" mode).
// - dropout_add_ln_fwd_loop (rows beyond the registers): one row per
//   512-thread block; pass 1 forms s (stored) and a Chan/Welford state of
//   s - s[row, 0] per thread, pass 2 reads s back (L2) for y.
// - dropout_add_ln_bwd (register path): as layer norm's backward, G blocks
//   (fixed by the shapes) walk the row groups; each thread keeps dw/db for
//   its columns in registers; partial rows per block, reduced in block
//   order by dropout_sum_partials. Reads dy, s (+ dres_in, mean, rstd, w,
//   n/8 bytes of bits), writes dx, dres (+ 2 * G * D * sizeof(A) partials).
// - dropout_add_ln_bwd_loop + dropout_add_ln_bwd_params: long rows, dx and
//   dres row by row (two walks), the partial rows column-parallel.
//
// Reduction order (every result bitwise identical run to run, at any launch
// geometry for the elementwise kernels): per thread in increasing index;
// rows: warp butterflies then warps in order (common.cuh); DropConnect per
// example: i (forward) or b (backward) increasing within one thread;
// partial rows in block order. No atomics.
//
// Limits: element counts < 2^63; rows M, D < 2^31; DropConnect per example
// O < 2^20 and (backward) N < 2^20 (65535 blocks along grid.y), K < 2^31.
#include "common.cuh"
#include "philox.cuh"

namespace fastreg {

// ------------------------------------------------------------------ arithmetic
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// v rounded to T and back (the identity for float and double).
template <typename T, typename A>
__device__ __forceinline__ A round_to(A v) { return to_acc(Store<T>::from(v)); }
template <> __device__ __forceinline__ float round_to<float, float>(float v) { return v; }
template <> __device__ __forceinline__ double round_to<double, double>(double v) { return v; }

// x * m in T's arithmetic, and x * m + r with two roundings in T.
template <typename T, typename A>
__device__ __forceinline__ A dropped(A x, A m) { return round_to<T>(mul_rn(x, m)); }
template <typename T, typename A>
__device__ __forceinline__ A dropped_add(A x, A m, A r) {
  return round_to<T>(add_rn(dropped<T>(x, m), r));
}

__device__ __forceinline__ unsigned low_bits(int count) {
  return count >= 32 ? 0xffffffffu : ((1u << count) - 1u);
}

// Bits e0 .. e0 + count - 1 of a "bits" mask (count <= 25): bit j is element e0 + j.
__device__ __forceinline__ unsigned mask_bits_run(const unsigned* __restrict__ bits,
                                                  unsigned long long e0, int count) {
  const unsigned long long q = e0 >> 5;
  const unsigned sh = unsigned(e0 & 31ull);
  unsigned v = bits[q] >> sh;
  if (sh + unsigned(count) > 32u) v |= bits[q + 1] << (32u - sh);
  return v & low_bits(count);
}

// ------------------------------------------------------------------ units of 8 elements
enum { kUnit = 8 };

// The 8 elements at p: 16-byte vectors when vec (p 16-byte aligned and the
// unit whole), else scalar loads of the first count (the rest 0).
template <typename T, typename A>
__device__ __forceinline__ void load_unit(const T* __restrict__ p, int count, bool vec, A (&v)[kUnit]) {
  if (vec && count == kUnit) {
#pragma unroll
    for (int k = 0; k < kUnit / Vec<T>::N; ++k) load_vec(p + k * Vec<T>::N, v + k * Vec<T>::N);
  } else {
#pragma unroll
    for (int j = 0; j < kUnit; ++j) v[j] = j < count ? to_acc(p[j]) : A(0);
  }
}

template <typename T, typename A>
__device__ __forceinline__ void store_unit(T* __restrict__ p, int count, bool vec, const A (&v)[kUnit]) {
  if (vec && count == kUnit) {
#pragma unroll
    for (int k = 0; k < kUnit / Vec<T>::N; ++k) store_vec(p + k * Vec<T>::N, v + k * Vec<T>::N);
  } else {
#pragma unroll
    for (int j = 0; j < kUnit; ++j)
      if (j < count) p[j] = from_acc<T>(v[j]);
  }
}

__device__ __forceinline__ int unit_count(long long u, long long n) {
  const long long rest = n - u * kUnit;
  return rest <= 0 ? 0 : rest >= kUnit ? kUnit : int(rest);
}

// Writes the warp's 8 mask words first_word .. first_word + 7 (those < nwords)
// from each lane's 8 keep bits (lane l: elements 8 l .. 8 l + 7 of the words'
// 256). Every lane of the warp must call it.
__device__ __forceinline__ void store_mask_words(unsigned* __restrict__ bits,
                                                 long long first_word, long long nwords,
                                                 unsigned byte) {
  unsigned b[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) b[j] = __ballot_sync(kFullMask, (byte >> j) & 1u);
  const int lane = threadIdx.x & 31;
  if (lane < 8 && first_word + lane < nwords) {
    unsigned w = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const unsigned nib = (b[j] >> (4 * lane)) & 0xfu;  // lanes 4q .. 4q+3, element j
      w |= ((nib & 1u) | ((nib & 2u) << 7) | ((nib & 4u) << 14) | ((nib & 8u) << 21)) << j;
    }
    bits[first_word + lane] = w;
  }
}

// Warp w of W (block-wide numbering) walks its warp-sized ranges of 8 units.
__device__ __forceinline__ long long global_warp() {
  return ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
}
__device__ __forceinline__ long long global_warps() {
  return ((long long)gridDim.x * blockDim.x) >> 5;
}

// ------------------------------------------------------------------ dropout
// y = x * m over n elements; bits (nullable) gets the keep bits.
// Grid: any; blockDim a multiple of 32 (the ballots need whole warps).
template <typename T>
__device__ __forceinline__ void dropout_fwd(const T* __restrict__ x, T* __restrict__ y,
                                            unsigned* __restrict__ bits, long long n, Stream st,
                                            unsigned long long threshold,
                                            typename Acc<T>::type scale, int vec) {
  typedef typename Acc<T>::type A;
  const long long units = (n + kUnit - 1) / kUnit, nwords = (n + 31) / 32;
  const int lane = threadIdx.x & 31;
  for (long long c = global_warp(); c * 32 < units; c += global_warps()) {  // warp-uniform
    const long long u = c * 32 + lane;
    const int count = unit_count(u, n);
    unsigned keep = 0;
    if (count > 0) {
      keep = keep_bits_run<kUnit>(st, (unsigned long long)u * kUnit, threshold) & low_bits(count);
      A v[kUnit];
      load_unit(x + u * kUnit, count, vec != 0, v);
#pragma unroll
      for (int j = 0; j < kUnit; ++j) v[j] = dropped<T>(v[j], (keep >> j) & 1u ? scale : A(0));
      store_unit(y + u * kUnit, count, vec != 0, v);
    }
    if (bits != nullptr) store_mask_words(bits, c * 8, nwords, keep);
  }
}

// dx = dy * m with m from the mask bits: unit u's bits are byte u of the words.
template <typename T>
__device__ __forceinline__ void dropout_bwd_bits(const T* __restrict__ dy,
                                                 const unsigned* __restrict__ bits,
                                                 T* __restrict__ dx, long long n,
                                                 typename Acc<T>::type scale, int vec) {
  typedef typename Acc<T>::type A;
  const long long units = (n + kUnit - 1) / kUnit;
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(bits);
  for (long long u = (long long)blockIdx.x * blockDim.x + threadIdx.x; u < units;
       u += (long long)gridDim.x * blockDim.x) {
    const int count = unit_count(u, n);
    const unsigned keep = bytes[u];
    A v[kUnit];
    load_unit(dy + u * kUnit, count, vec != 0, v);
#pragma unroll
    for (int j = 0; j < kUnit; ++j) v[j] = dropped<T>(v[j], (keep >> j) & 1u ? scale : A(0));
    store_unit(dx + u * kUnit, count, vec != 0, v);
  }
}

// keep[e] = 1 or 0 (bytes), from the bits or from the stream (bits null).
__device__ __forceinline__ void keep_mask(const unsigned* __restrict__ bits,
                                          unsigned char* __restrict__ keep, long long n, Stream st,
                                          unsigned long long threshold) {
  const long long units = (n + kUnit - 1) / kUnit;
  const unsigned char* bytes = reinterpret_cast<const unsigned char*>(bits);
  for (long long u = (long long)blockIdx.x * blockDim.x + threadIdx.x; u < units;
       u += (long long)gridDim.x * blockDim.x) {
    const int count = unit_count(u, n);
    const unsigned k = bits != nullptr ? unsigned(bytes[u])
                                       : keep_bits_run<kUnit>(st, (unsigned long long)u * kUnit,
                                                              threshold);
    for (int j = 0; j < count; ++j) keep[u * kUnit + j] = (unsigned char)((k >> j) & 1u);
  }
}

// ------------------------------------------------------------------ Gaussian noise
// y = x + std * z (multiplicative = 0) or x * (1 + std * z), in double, rounded once.
template <typename T>
__device__ __forceinline__ void gaussian(const T* __restrict__ x, T* __restrict__ y, long long n,
                                         Stream st, double std, int multiplicative, int vec) {
  typedef typename Acc<T>::type A;
  const long long units = (n + kUnit - 1) / kUnit;
  for (long long u = (long long)blockIdx.x * blockDim.x + threadIdx.x; u < units;
       u += (long long)gridDim.x * blockDim.x) {
    const int count = unit_count(u, n);
    A v[kUnit];
    load_unit(x + u * kUnit, count, vec != 0, v);
    double z[2][4];
    box_muller(stream_block(st, 2 * u), z[0]);
    box_muller(stream_block(st, 2 * u + 1), z[1]);
    T* yu = y + u * kUnit;
    if (vec && count == kUnit) {
      A r[kUnit];
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        const double g = std * z[j >> 2][j & 3];
        r[j] = to_acc(FromDouble<T>::from(multiplicative ? double(v[j]) * (1.0 + g)
                                                         : double(v[j]) + g));
      }
      store_unit(yu, count, true, r);
    } else {
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        if (j >= count) break;
        const double g = std * z[j >> 2][j & 3];
        yu[j] = FromDouble<T>::from(multiplicative ? double(v[j]) * (1.0 + g) : double(v[j]) + g);
      }
    }
  }
}

// ------------------------------------------------------------------ stream draws
// out[e] = word (KIND 0, TO = unsigned), uniform (1) or normal (2) of element e.
template <typename TO, int KIND>
__device__ __forceinline__ void stream_fill(TO* __restrict__ out, long long n, Stream st) {
  const long long units = (n + kUnit - 1) / kUnit;
  for (long long u = (long long)blockIdx.x * blockDim.x + threadIdx.x; u < units;
       u += (long long)gridDim.x * blockDim.x) {
    const int count = unit_count(u, n);
    TO* o = out + u * kUnit;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint4 w = stream_block(st, 2 * u + h);
      const unsigned ws[4] = {w.x, w.y, w.z, w.w};
      double z[4];
      if constexpr (KIND == 2) box_muller(w, z);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (4 * h + j >= count) break;
        if constexpr (KIND == 0) o[4 * h + j] = ws[j];
        else if constexpr (KIND == 1) o[4 * h + j] = FromDouble<TO>::from(uniform24(ws[j]));
        else o[4 * h + j] = FromDouble<TO>::from(z[j]);
      }
    }
  }
}

// Philox of arbitrary counters: out[b] = philox(counter[b], key[b * key_step / 2]).
__device__ __forceinline__ void philox_blocks(const unsigned* __restrict__ counter,
                                              const unsigned* __restrict__ key,
                                              unsigned* __restrict__ out, long long nblocks,
                                              int key_step) {
  for (long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x; b < nblocks;
       b += (long long)gridDim.x * blockDim.x) {
    uint4 c;
    c.x = counter[4 * b];
    c.y = counter[4 * b + 1];
    c.z = counter[4 * b + 2];
    c.w = counter[4 * b + 3];
    const uint4 r = philox4x32_10(c, key[b * key_step], key[b * key_step + 1]);
    out[4 * b] = r.x;
    out[4 * b + 1] = r.y;
    out[4 * b + 2] = r.z;
    out[4 * b + 3] = r.w;
  }
}

// ------------------------------------------------------------------ DropConnect per example
enum { kTile = 16, kTileK = 32, kRun = 4, kTileI = kTile * kRun };

// y[s, o] = scale * sum_i keep(r K + i) w[o, i] x[s, i] + b[o], r = s O + o.
// Block (16, 16): threadIdx.x -> s, threadIdx.y -> o; grid (ceil(N/16), ceil(O/16)).
template <typename T>
__device__ __forceinline__ void drop_connect_examples_fwd(
    const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ y,
    int N, int O, int K, Stream st, unsigned long long threshold, typename Acc<T>::type scale) {
  typedef typename Acc<T>::type A;
  __shared__ A xs[kTile][kTileK + 1];
  __shared__ A ws[kTile][kTileK + 1];
  const int tid = threadIdx.y * kTile + threadIdx.x;
  const int s0 = blockIdx.x * kTile, o0 = blockIdx.y * kTile;
  const int s = s0 + threadIdx.x, o = o0 + threadIdx.y;
  const bool active = s < N && o < O;
  const unsigned long long row = active ? (unsigned long long)s * O + o : 0ull;
  A acc = A(0);
  for (int k0 = 0; k0 < K; k0 += kTileK) {
    for (int q = tid; q < kTile * kTileK; q += kTile * kTile) {
      const int r = q / kTileK, c = q % kTileK;
      xs[r][c] = (s0 + r < N && k0 + c < K) ? to_acc(x[(long long)(s0 + r) * K + k0 + c]) : A(0);
      ws[r][c] = (o0 + r < O && k0 + c < K) ? to_acc(w[(long long)(o0 + r) * K + k0 + c]) : A(0);
    }
    __syncthreads();
    if (active) {
      const int k1 = k0 + kTileK < K ? k0 + kTileK : K;
      const A* xr = xs[threadIdx.x];
      const A* wr = ws[threadIdx.y];
      if (threshold == 0ull) {
        for (int i = 0; i < k1 - k0; ++i) acc += xr[i] * wr[i];
      } else {
        // the Philox blocks of stream elements row K + k0 .. row K + k1 - 1, in order
        const unsigned long long e_begin = row * K + k0, e_end = row * K + k1;
        for (unsigned long long blk = e_begin >> 2; 4 * blk < e_end; ++blk) {
          const uint4 wd = stream_block(st, blk);
          const unsigned words[4] = {wd.x, wd.y, wd.z, wd.w};
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const unsigned long long e = 4 * blk + j;
            if (e >= e_begin && e < e_end && keeps(words[j], threshold)) {
              const int i = int(e - e_begin);
              acc += xr[i] * wr[i];
            }
          }
        }
      }
    }
    __syncthreads();
  }
  if (active) y[(long long)s * O + o] = from_acc<T>(acc * scale + (b != nullptr ? to_acc(b[o]) : A(0)));
}

// out[a, i] = scale * sum_b dy[row] keep(row K + i) mat[b, i], row = a ra + b rb.
// Block (16, 16): threadIdx.x -> 4 consecutive i (64 per block), threadIdx.y -> a;
// grid (ceil(K / 64), ceil(NA / 16)); b in tiles of 16 through shared memory.
template <typename T>
__device__ __forceinline__ void drop_connect_examples_bwd(
    const T* __restrict__ dy, const T* __restrict__ mat, T* __restrict__ out, int NA, int NB,
    int K, long long ra, long long rb, Stream st, unsigned long long threshold,
    typename Acc<T>::type scale) {
  typedef typename Acc<T>::type A;
  __shared__ A gs[kTile][kTile + 1];
  __shared__ A ms[kTile][kTileI];
  const int tid = threadIdx.y * kTile + threadIdx.x;
  const int i0 = blockIdx.x * kTileI, a0 = blockIdx.y * kTile;
  const int i = i0 + kRun * threadIdx.x, a = a0 + threadIdx.y;
  const int count = a < NA ? (K - i >= kRun ? kRun : (K - i > 0 ? K - i : 0)) : 0;
  A acc[kRun] = {A(0), A(0), A(0), A(0)};
  for (int b0 = 0; b0 < NB; b0 += kTile) {
    for (int q = tid; q < kTile * kTile; q += kTile * kTile) {
      const int r = q / kTile, c = q % kTile;  // gs[a][b]
      gs[r][c] = (a0 + r < NA && b0 + c < NB) ? to_acc(dy[(a0 + r) * ra + (b0 + c) * rb]) : A(0);
    }
    for (int q = tid; q < kTile * kTileI; q += kTile * kTile) {
      const int r = q / kTileI, c = q % kTileI;  // ms[b][i]
      ms[r][c] = (b0 + r < NB && i0 + c < K) ? to_acc(mat[(long long)(b0 + r) * K + i0 + c]) : A(0);
    }
    __syncthreads();
    if (count > 0) {
      const int nb = NB - b0 < kTile ? NB - b0 : kTile;
      for (int bl = 0; bl < nb; ++bl) {
        const unsigned long long row = (unsigned long long)(a * ra + (b0 + bl) * rb);
        const unsigned keep = keep_bits_run<kRun>(st, row * K + i, threshold);
        const A g = gs[threadIdx.y][bl];
#pragma unroll
        for (int j = 0; j < kRun; ++j)
          if (j < count && ((keep >> j) & 1u)) acc[j] += g * ms[bl][kRun * threadIdx.x + j];
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < kRun; ++j)
    if (j < count) out[(long long)a * K + i + j] = from_acc<T>(acc[j] * scale);
}

// ------------------------------------------------------------------ moment matching
// y[r] = mean over k < S of act(mean[r] + sqrt(var[r]) * z[r S + k]), in double;
// act: 0 identity, 1 relu, 2 tanh, 3 sigmoid. One thread per output.
__device__ __forceinline__ double activate(double u, int act) {
  if (act == 1) return u > 0.0 ? u : 0.0;
  if (act == 2) return tanh(u);
  if (act == 3) return 1.0 / (1.0 + exp(-u));
  return u;
}

template <typename T>
__device__ __forceinline__ void moment_matching(const double* __restrict__ mean,
                                                const double* __restrict__ var,
                                                T* __restrict__ y, long long R, int S, Stream st,
                                                int act) {
  for (long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x; r < R;
       r += (long long)gridDim.x * blockDim.x) {
    const double mu = mean[r], sd = sqrt(var[r]);
    const unsigned long long e_begin = (unsigned long long)r * S, e_end = e_begin + S;
    double acc = 0.0;
    for (unsigned long long blk = e_begin >> 2; 4 * blk < e_end; ++blk) {
      double z[4];
      box_muller(stream_block(st, blk), z);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const unsigned long long e = 4 * blk + j;
        if (e >= e_begin && e < e_end) acc += activate(mu + sd * z[j], act);
      }
    }
    y[r] = FromDouble<T>::from(acc / double(S));
  }
}

// ------------------------------------------------------------------ fused dropout + add + LN
// Rows of D elements; thread t of a row group of R threads owns, per slot k,
// the N = Vec<T>::N consecutive columns (k R + t) N .. (k R + t) N + N - 1.
template <typename T>
__device__ __forceinline__ int slot_first(int k, int R, int t) { return (k * R + t) * Vec<T>::N; }
__device__ __forceinline__ int slot_count(int first, int D, int N) {
  return first >= D ? 0 : (D - first >= N ? N : D - first);
}

// A slot of a row (0 beyond the row): 16 bytes when vec, else scalar loads.
template <typename T, typename A>
__device__ __forceinline__ void load_slot(const T* __restrict__ p, int count, bool vec, A* v) {
  const int N = Vec<T>::N;
  if (vec && count == N) {
    load_vec(p, v);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = i < count ? to_acc(p[i]) : A(0);
  }
}
template <typename T, typename A>
__device__ __forceinline__ void store_slot(T* __restrict__ p, int count, bool vec, const A* v) {
  const int N = Vec<T>::N;
  if (vec && count == N) {
    store_vec(p, v);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < count) p[i] = from_acc<T>(v[i]);
  }
}
// A parameter slot; `fill` where p is null or beyond the row.
template <typename T, typename A>
__device__ __forceinline__ void load_param_slot(const T* __restrict__ p, int count, bool vec, A fill,
                                                A* v) {
  const int N = Vec<T>::N;
  if (p != nullptr && vec && count == N) {
    load_vec(p, v);
    return;
  }
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = (p != nullptr && i < count) ? to_acc(p[i]) : fill;
}

// Keep bits of a slot: from the stream, the bits, or all kept.
template <int N>
__device__ __forceinline__ unsigned slot_keep(const unsigned* __restrict__ bits, const Stream& st,
                                              unsigned long long threshold, unsigned long long e0,
                                              int count) {
  if (count <= 0) return 0u;
  if (bits != nullptr) return mask_bits_run(bits, e0, count);
  return keep_bits_run<N>(st, e0, threshold) & low_bits(count);
}

// The mask words whose first element lies in elements [e_begin, e_end) of the
// n in all, from the stream; every thread of the block calls it.
__device__ __forceinline__ void store_owned_words(unsigned* __restrict__ bits, long long e_begin,
                                                  long long e_end, long long n, Stream st,
                                                  unsigned long long threshold) {
  const long long q_begin = (e_begin + 31) / 32, q_end = (e_end + 31) / 32;
  const int warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5, lane = threadIdx.x & 31;
  for (long long q = q_begin + 8 * warp; q < q_end; q += 8 * (long long)nwarps) {  // warp-uniform
    const long long e0 = 32 * q + kUnit * lane;
    const int count = e0 < n ? (n - e0 >= kUnit ? kUnit : int(n - e0)) : 0;
    const unsigned keep =
        count > 0 ? keep_bits_run<kUnit>(st, (unsigned long long)e0, threshold) & low_bits(count) : 0u;
    store_mask_words(bits, q, q_end, keep);
  }
}

// Forward, register path. Grid: ceil(M / (blockDim / R)) blocks; group g of
// block b owns row b * (blockDim / R) + g.
template <typename T, int K>
__device__ __forceinline__ void dropout_add_ln_fwd(
    const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
    const T* __restrict__ b, T* __restrict__ y, T* __restrict__ s_out,
    typename Acc<T>::type* __restrict__ mean, typename Acc<T>::type* __restrict__ rstd,
    unsigned* __restrict__ bits, int M, int D, typename Acc<T>::type eps, int R, int vec,
    Stream st, unsigned long long threshold, typename Acc<T>::type scale) {
  typedef typename Acc<T>::type A;
  const int N = Vec<T>::N;
  __shared__ A scratch[3 * 32];
  const int t = threadIdx.x & (R - 1), rows_per_block = blockDim.x / R;
  const long long row = (long long)blockIdx.x * rows_per_block + threadIdx.x / R;
  const bool active = row < M;
  const long long base = active ? row * D : 0;
  const A n = A(D > 0 ? D : 1);

  A v[K][N];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c0 = slot_first<T>(k, R, t);
    const int count = active ? slot_count(c0, D, N) : 0;
    A xv[N], rv[N];
    load_slot(x + base + c0, count, vec != 0, xv);
    load_slot(res + base + c0, count, vec != 0, rv);
    const unsigned keep = slot_keep<N>(nullptr, st, threshold, (unsigned long long)(base + c0), count);
#pragma unroll
    for (int i = 0; i < N; ++i)
      v[k][i] = i < count ? dropped_add<T>(xv[i], (keep >> i) & 1u ? scale : A(0), rv[i]) : A(0);
    if (count > 0) store_slot(s_out + base + c0, count, vec != 0, v[k]);
  }

  A sum[1] = {A(0)};
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int i = 0; i < N; ++i) sum[0] += v[k][i];
  group_sum(sum, R, scratch);
  // mu is the mean rounded to A (off by up to half an ulp of it: 0.03 at a mean of
  // 1e6 in float32); for float accumulators the centred sums recover it (corrected
  // two-pass, as kernels/norm.cu). Double keeps the plain two-pass: its rounding is
  // the data's own, and the extra accumulator would spill the f64 k4 kernel.
  const A mu = sum[0] / n;
  A dm = A(0), var;
  if (sizeof(A) == 4) {
    A q[2] = {A(0), A(0)};
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int count = slot_count(slot_first<T>(k, R, t), D, N);
#pragma unroll
      for (int i = 0; i < N; ++i)
        if (i < count) {
          const A c = v[k][i] - mu;
          q[0] += c;
          q[1] += c * c;
        }
    }
    group_sum(q, R, scratch + 32);
    dm = q[0] / n;
    var = q[1] / n - dm * dm;
    var = var < A(0) ? A(0) : var;  // NaN stays NaN
  } else {
    A q[1] = {A(0)};
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int count = slot_count(slot_first<T>(k, R, t), D, N);
#pragma unroll
      for (int i = 0; i < N; ++i)
        if (i < count) q[0] += (v[k][i] - mu) * (v[k][i] - mu);
    }
    group_sum(q, R, scratch + 32);
    var = q[0] / n;
  }
  const A r = rsqrt_acc(var + eps);

#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c0 = slot_first<T>(k, R, t);
    const int count = active ? slot_count(c0, D, N) : 0;
    if (count == 0) continue;
    A wv[N], bv[N];
    load_param_slot(w == nullptr ? w : w + c0, count, vec != 0, A(1), wv);
    load_param_slot(b == nullptr ? b : b + c0, count, vec != 0, A(0), bv);
#pragma unroll
    for (int i = 0; i < N; ++i) v[k][i] = ((v[k][i] - mu) - dm) * r * wv[i] + bv[i];
    store_slot(y + base + c0, count, vec != 0, v[k]);
  }
  if (active && t == 0) {
    mean[row] = mu + dm;
    rstd[row] = r;
  }
  if (bits != nullptr) {
    const long long first = (long long)blockIdx.x * rows_per_block;
    const long long last = first + rows_per_block < M ? first + rows_per_block : M;
    store_owned_words(bits, first * D, last * D, (long long)M * D, st, threshold);
  }
}

// Forward, loop path: one row per block, walked in tiles of blockDim * N.
template <typename T>
__device__ __forceinline__ void dropout_add_ln_fwd_loop(
    const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,
    const T* __restrict__ b, T* __restrict__ y, T* __restrict__ s_out,
    typename Acc<T>::type* __restrict__ mean, typename Acc<T>::type* __restrict__ rstd,
    unsigned* __restrict__ bits, int M, int D, typename Acc<T>::type eps, int vec, Stream st,
    unsigned long long threshold, typename Acc<T>::type scale) {
  typedef typename Acc<T>::type A;
  const int N = Vec<T>::N;
  __shared__ A scratch[3 * 32];
  const int R = blockDim.x, t = threadIdx.x;
  const long long row = blockIdx.x, base = row * D;
  const A n = A(D > 0 ? D : 1);

  // The statistics of s - s[row, 0] (thread 0 forms that element, as the walk does):
  // a mean reduced in A is off by up to half an ulp of itself, which y would carry;
  // near the data s - shift is exact and the shifted mean small (kernels/norm.cu).
  __shared__ A shift_s;
  if (t == 0) {
    A s0 = A(0);
    if (D > 0) {
      const unsigned keep0 = slot_keep<N>(nullptr, st, threshold, (unsigned long long)base, 1);
      s0 = dropped_add<T>(to_acc(x[base]), keep0 & 1u ? scale : A(0), to_acc(res[base]));
    }
    shift_s = s0;
  }
  __syncthreads();
  const A shift = shift_s;
  Welford<A> stat = {A(0), A(0), A(0)};
  for (int tile = 0; tile < D; tile += R * N) {
    const int c0 = tile + t * N;
    const int count = slot_count(c0, D, N);
    if (count == 0) continue;
    A xv[N], rv[N], v[N];
    load_slot(x + base + c0, count, vec != 0, xv);
    load_slot(res + base + c0, count, vec != 0, rv);
    const unsigned keep = slot_keep<N>(nullptr, st, threshold, (unsigned long long)(base + c0), count);
    Welford<A> c = {A(count), A(0), A(0)};
#pragma unroll
    for (int i = 0; i < N; ++i) {
      v[i] = i < count ? dropped_add<T>(xv[i], (keep >> i) & 1u ? scale : A(0), rv[i]) : A(0);
      if (i < count) c.mean += v[i] - shift;
    }
    c.mean /= c.n;
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < count) c.m2 += ((v[i] - shift) - c.mean) * ((v[i] - shift) - c.mean);
    stat = welford_merge(stat, c);
    store_slot(s_out + base + c0, count, vec != 0, v);
  }
  stat = block_welford(stat, scratch);
  const A mu = stat.mean, r = rsqrt_acc(stat.m2 / n + eps);
  for (int tile = 0; tile < D; tile += R * N) {
    const int c0 = tile + t * N;
    const int count = slot_count(c0, D, N);
    if (count == 0) continue;
    A v[N], wv[N], bv[N];
    load_slot(s_out + base + c0, count, vec != 0, v);  // this thread's own writes
    load_param_slot(w == nullptr ? w : w + c0, count, vec != 0, A(1), wv);
    load_param_slot(b == nullptr ? b : b + c0, count, vec != 0, A(0), bv);
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = ((v[i] - shift) - mu) * r * wv[i] + bv[i];
    store_slot(y + base + c0, count, vec != 0, v);
  }
  if (t == 0) {
    mean[row] = shift + mu;
    rstd[row] = r;
  }
  if (bits != nullptr) store_owned_words(bits, base, base + D, (long long)M * D, st, threshold);
}

// One partial row per block: the block's row groups' accumulators added in
// group order (through dynamic shared memory when there are several groups).
template <typename T, int K, typename A>
__device__ __forceinline__ void block_partial_row(A* __restrict__ part, const A (&acc)[K][Vec<T>::N],
                                                  int D, int R, int groups, int g, int t) {
  const int N = Vec<T>::N;
  if (part == nullptr) return;
  part += (long long)blockIdx.x * D;
  if (groups == 1) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c0 = slot_first<T>(k, R, t), count = slot_count(c0, D, N);
#pragma unroll
      for (int i = 0; i < N; ++i)
        if (i < count) part[c0 + i] = acc[k][i];
    }
    return;
  }
  FASTREG_DYNAMIC_SHARED(A, rows);
  __syncthreads();  // earlier readers of `rows` (the previous gradient) are done
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int c0 = slot_first<T>(k, R, t), count = slot_count(c0, D, N);
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < count) rows[g * D + c0 + i] = acc[k][i];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    A sum = rows[c];
    for (int j = 1; j < groups; ++j) sum += rows[j * D + c];
    part[c] = sum;
  }
}

// Backward, register path. Grid: G blocks walking row groups b, b + G, ...
// dw_part/db_part: G rows of D (null when not wanted). Dynamic shared memory:
// (blockDim / R) * D * sizeof(A) when a block holds several groups.
template <typename T, int K>
__device__ __forceinline__ void dropout_add_ln_bwd(
    const T* __restrict__ dy, const T* __restrict__ s, const typename Acc<T>::type* __restrict__ mean,
    const typename Acc<T>::type* __restrict__ rstd, const T* __restrict__ w,
    const T* __restrict__ dres_in, const unsigned* __restrict__ bits, T* __restrict__ dx,
    T* __restrict__ dres, typename Acc<T>::type* __restrict__ dw_part,
    typename Acc<T>::type* __restrict__ db_part, int M, int D, int R, int vec, Stream st,
    unsigned long long threshold, typename Acc<T>::type scale) {
  typedef typename Acc<T>::type A;
  const int N = Vec<T>::N;
  __shared__ A scratch[2][2 * 32];
  const int groups = blockDim.x / R, g = threadIdx.x / R, t = threadIdx.x & (R - 1);
  const A n = A(D > 0 ? D : 1);

  A adw[K][N], adb[K][N];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int i = 0; i < N; ++i) adw[k][i] = adb[k][i] = A(0);

  int parity = 0;
  for (long long first = (long long)blockIdx.x * groups; first < M;
       first += (long long)gridDim.x * groups, parity ^= 1) {
    const long long row = first + g;
    const bool active = row < M;
    const long long base = active ? row * D : 0;
    const A mu = active ? mean[row] : A(0), r = active ? rstd[row] : A(0);
    A xv[K][N], gv[K][N];
    A sums[2] = {A(0), A(0)};  // sum g, sum g * xhat, with g = dy * w
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c0 = slot_first<T>(k, R, t);
      const int count = active ? slot_count(c0, D, N) : 0;
      A wv[N];
      load_slot(s + base + c0, count, vec != 0, xv[k]);
      load_slot(dy + base + c0, count, vec != 0, gv[k]);
      load_param_slot(w == nullptr ? w : w + c0, count, vec != 0, A(1), wv);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        // slots beyond the row hold dy = 0 and add 0 everywhere below
        const A xh = (xv[k][i] - mu) * r, d = gv[k][i];
        adw[k][i] += d * xh;
        adb[k][i] += d;
        const A gw = d * wv[i];
        sums[0] += gw;
        sums[1] += gw * xh;
        xv[k][i] = xh;
        gv[k][i] = gw;
      }
    }
    group_sum(sums, R, scratch[parity]);
    const A a = sums[0] / n, c = sums[1] / n;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int c0 = slot_first<T>(k, R, t);
      const int count = active ? slot_count(c0, D, N) : 0;
      if (count == 0) continue;
      A e[N], rin[N];
      load_slot(dres_in == nullptr ? dres_in : dres_in + base + c0, dres_in == nullptr ? 0 : count,
                vec != 0, rin);
      const unsigned keep = slot_keep<N>(bits, st, threshold, (unsigned long long)(base + c0), count);
#pragma unroll
      for (int i = 0; i < N; ++i) e[i] = r * (gv[k][i] - a - xv[k][i] * c) + rin[i];
      store_slot(dres + base + c0, count, vec != 0, e);
#pragma unroll
      for (int i = 0; i < N; ++i) e[i] = e[i] * ((keep >> i) & 1u ? scale : A(0));
      store_slot(dx + base + c0, count, vec != 0, e);
    }
  }
  block_partial_row<T>(dw_part, adw, D, R, groups, g, t);
  block_partial_row<T>(db_part, adb, D, R, groups, g, t);
}

// Backward, loop path (dx and dresidual only): one row per block, two walks.
template <typename T>
__device__ __forceinline__ void dropout_add_ln_bwd_loop(
    const T* __restrict__ dy, const T* __restrict__ s, const typename Acc<T>::type* __restrict__ mean,
    const typename Acc<T>::type* __restrict__ rstd, const T* __restrict__ w,
    const T* __restrict__ dres_in, const unsigned* __restrict__ bits, T* __restrict__ dx,
    T* __restrict__ dres, int D, int vec, Stream st, unsigned long long threshold,
    typename Acc<T>::type scale) {
  typedef typename Acc<T>::type A;
  const int N = Vec<T>::N;
  __shared__ A scratch[2 * 32];
  const int R = blockDim.x, t = threadIdx.x;
  const long long row = blockIdx.x, base = row * D;
  const A n = A(D > 0 ? D : 1), mu = mean[row], r = rstd[row];
  A sums[2] = {A(0), A(0)};
  for (int tile = 0; tile < D; tile += R * N) {
    const int c0 = tile + t * N, count = slot_count(c0, D, N);
    A xv[N], gv[N], wv[N];
    load_slot(s + base + c0, count, vec != 0, xv);
    load_slot(dy + base + c0, count, vec != 0, gv);
    load_param_slot(w == nullptr ? w : w + c0, count, vec != 0, A(1), wv);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const A gw = gv[i] * wv[i];  // 0 beyond the row
      sums[0] += gw;
      sums[1] += gw * ((xv[i] - mu) * r);
    }
  }
  group_sum(sums, R, scratch);
  const A a = sums[0] / n, c = sums[1] / n;
  for (int tile = 0; tile < D; tile += R * N) {
    const int c0 = tile + t * N, count = slot_count(c0, D, N);
    if (count == 0) continue;
    A xv[N], gv[N], wv[N], rin[N], e[N];
    load_slot(s + base + c0, count, vec != 0, xv);
    load_slot(dy + base + c0, count, vec != 0, gv);
    load_param_slot(w == nullptr ? w : w + c0, count, vec != 0, A(1), wv);
    load_slot(dres_in == nullptr ? dres_in : dres_in + base + c0, dres_in == nullptr ? 0 : count,
              vec != 0, rin);
    const unsigned keep = slot_keep<N>(bits, st, threshold, (unsigned long long)(base + c0), count);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = r * (gv[i] * wv[i] - a - (xv[i] - mu) * r * c) + rin[i];
    store_slot(dres + base + c0, count, vec != 0, e);
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = e[i] * ((keep >> i) & 1u ? scale : A(0));
    store_slot(dx + base + c0, count, vec != 0, e);
  }
}

// Partial rows of dw/db for the loop path, column-parallel: block (bx, by) covers
// columns [bx * blockDim.x, ...) and rows [by * rows_per_part, ...), in row order.
template <typename T>
__device__ __forceinline__ void dropout_add_ln_bwd_params(
    const T* __restrict__ dy, const T* __restrict__ s, const typename Acc<T>::type* __restrict__ mean,
    const typename Acc<T>::type* __restrict__ rstd, typename Acc<T>::type* __restrict__ dw_part,
    typename Acc<T>::type* __restrict__ db_part, int M, int D, int rows_per_part) {
  typedef typename Acc<T>::type A;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= D) return;
  const long long first = (long long)blockIdx.y * rows_per_part;
  const long long last = first + rows_per_part < M ? first + rows_per_part : M;
  A sw = A(0), sb = A(0);
  for (long long row = first; row < last; ++row) {
    const A d = to_acc(dy[row * D + c]);
    sw += d * ((to_acc(s[row * D + c]) - mean[row]) * rstd[row]);
    sb += d;
  }
  const long long o = (long long)blockIdx.y * D + c;
  if (dw_part != nullptr) dw_part[o] = sw;
  if (db_part != nullptr) db_part[o] = sb;
}

__device__ __forceinline__ Stream make_stream(unsigned k0, unsigned k1, unsigned long long offset) {
  Stream s;
  s.k0 = k0;
  s.k1 = k1;
  s.offset = offset;
  return s;
}

}  // namespace fastreg

// ------------------------------------------------------------------ instances
// The stream arrives as (k0, k1, offset): the key words and the first block.
#define FASTREG_STREAM unsigned k0, unsigned k1, unsigned long long offset
#define FASTREG_ST fastreg::make_stream(k0, k1, offset)

#define FASTREG_LN_FWD_PARAMS(T, A)                                                               \
  (const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w,                  \
   const T* __restrict__ b, T* __restrict__ y, T* __restrict__ s_out, A* __restrict__ mean,       \
   A* __restrict__ rstd, unsigned* __restrict__ bits, int M, int D, A eps, int R, int vec,        \
   FASTREG_STREAM, unsigned long long threshold, A scale)
#define FASTREG_LN_BWD_PARAMS(T, A)                                                               \
  (const T* __restrict__ dy, const T* __restrict__ s, const A* __restrict__ mean,                 \
   const A* __restrict__ rstd, const T* __restrict__ w, const T* __restrict__ dres_in,            \
   const unsigned* __restrict__ bits, T* __restrict__ dx, T* __restrict__ dres,                   \
   A* __restrict__ dw_part, A* __restrict__ db_part, int M, int D, int R, int vec,                \
   FASTREG_STREAM, unsigned long long threshold, A scale)

#define FASTREG_LN_FWD(T, A, tag, K, max_threads)                                                 \
  FASTREG_KERNEL(dropout_add_ln_fwd_##tag##_k##K, max_threads, FASTREG_LN_FWD_PARAMS(T, A),       \
                 (fastreg::dropout_add_ln_fwd<T, K>(x, res, w, b, y, s_out, mean, rstd, bits, M,  \
                                                    D, eps, R, vec, FASTREG_ST, threshold, scale)))
#define FASTREG_LN_BWD(T, A, tag, K, max_threads)                                                 \
  FASTREG_KERNEL(dropout_add_ln_bwd_##tag##_k##K, max_threads, FASTREG_LN_BWD_PARAMS(T, A),       \
                 (fastreg::dropout_add_ln_bwd<T, K>(dy, s, mean, rstd, w, dres_in, bits, dx,      \
                                                    dres, dw_part, db_part, M, D, R, vec,         \
                                                    FASTREG_ST, threshold, scale)))

// The kernels of one dtype that do not depend on K.
#define FASTREG_DROPOUT_INSTANCES(T, A, tag)                                                      \
  FASTREG_KERNEL(dropout_fwd_##tag, 1024,                                                         \
                 (const T* __restrict__ x, T* __restrict__ y, unsigned* __restrict__ bits,        \
                  long long n, FASTREG_STREAM, unsigned long long threshold, A scale, int vec),   \
                 (fastreg::dropout_fwd<T>(x, y, bits, n, FASTREG_ST, threshold, scale, vec)))    \
  FASTREG_KERNEL(dropout_bwd_bits_##tag, 1024,                                                    \
                 (const T* __restrict__ dy, const unsigned* __restrict__ bits, T* __restrict__ dx, \
                  long long n, A scale, int vec),                                                 \
                 (fastreg::dropout_bwd_bits<T>(dy, bits, dx, n, scale, vec)))                     \
  FASTREG_KERNEL(gaussian_##tag, 1024,                                                            \
                 (const T* __restrict__ x, T* __restrict__ y, long long n, FASTREG_STREAM,         \
                  double std, int multiplicative, int vec),                                       \
                 (fastreg::gaussian<T>(x, y, n, FASTREG_ST, std, multiplicative, vec)))          \
  FASTREG_KERNEL(uniform_##tag, 1024, (T* __restrict__ out, long long n, FASTREG_STREAM),         \
                 (fastreg::stream_fill<T, 1>(out, n, FASTREG_ST)))                                \
  FASTREG_KERNEL(normal_##tag, 1024, (T* __restrict__ out, long long n, FASTREG_STREAM),          \
                 (fastreg::stream_fill<T, 2>(out, n, FASTREG_ST)))                                \
  FASTREG_KERNEL(drop_connect_examples_fwd_##tag, 256,                                            \
                 (const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,      \
                  T* __restrict__ y, int N, int O, int K, FASTREG_STREAM,                         \
                  unsigned long long threshold, A scale),                                         \
                 (fastreg::drop_connect_examples_fwd<T>(x, w, b, y, N, O, K, FASTREG_ST,          \
                                                        threshold, scale)))                       \
  FASTREG_KERNEL(drop_connect_examples_bwd_##tag, 256,                                            \
                 (const T* __restrict__ dy, const T* __restrict__ mat, T* __restrict__ out,       \
                  int NA, int NB, int K, long long ra, long long rb, FASTREG_STREAM,              \
                  unsigned long long threshold, A scale),                                         \
                 (fastreg::drop_connect_examples_bwd<T>(dy, mat, out, NA, NB, K, ra, rb,          \
                                                        FASTREG_ST, threshold, scale)))           \
  FASTREG_KERNEL(moment_matching_##tag, 256,                                                      \
                 (const double* __restrict__ mean, const double* __restrict__ var,                 \
                  T* __restrict__ y, long long R, int S, FASTREG_STREAM, int act),                \
                 (fastreg::moment_matching<T>(mean, var, y, R, S, FASTREG_ST, act)))              \
  FASTREG_KERNEL(dropout_add_ln_fwd_##tag##_loop, 512, FASTREG_LN_FWD_PARAMS(T, A),               \
                 (fastreg::dropout_add_ln_fwd_loop<T>(x, res, w, b, y, s_out, mean, rstd, bits,   \
                                                      M, D, eps, vec, FASTREG_ST, threshold,      \
                                                      scale)))                                    \
  FASTREG_KERNEL(dropout_add_ln_bwd_##tag##_loop, 512, FASTREG_LN_BWD_PARAMS(T, A),               \
                 (fastreg::dropout_add_ln_bwd_loop<T>(dy, s, mean, rstd, w, dres_in, bits, dx,    \
                                                      dres, D, vec, FASTREG_ST, threshold,        \
                                                      scale)))                                    \
  FASTREG_KERNEL(dropout_add_ln_bwd_params_##tag, 256, FASTREG_LN_BWD_PARAMS(T, A),               \
                 (fastreg::dropout_add_ln_bwd_params<T>(dy, s, mean, rstd, dw_part, db_part, M,   \
                                                        D, R)))                                   \
  FASTREG_KERNEL(dropout_sum_partials_##tag, 256,                                                 \
                 (const A* __restrict__ part, int G, int D, T* __restrict__ out),                 \
                 (fastreg::sum_partials<T, A>(part, G, D, out)))

FASTREG_DROPOUT_INSTANCES(__half, float, f16)
FASTREG_DROPOUT_INSTANCES(__nv_bfloat16, float, bf16)
FASTREG_DROPOUT_INSTANCES(float, float, f32)
FASTREG_DROPOUT_INSTANCES(double, double, f64)

FASTREG_KERNEL(random_bits, 1024, (unsigned* __restrict__ out, long long n, FASTREG_STREAM),
               (fastreg::stream_fill<unsigned, 0>(out, n, FASTREG_ST)))
FASTREG_KERNEL(philox_blocks, 1024,
               (const unsigned* __restrict__ counter, const unsigned* __restrict__ key,
                unsigned* __restrict__ out, long long nblocks, int key_step),
               (fastreg::philox_blocks(counter, key, out, nblocks, key_step)))
FASTREG_KERNEL(keep_mask, 1024,
               (const unsigned* __restrict__ bits, unsigned char* __restrict__ keep, long long n,
                FASTREG_STREAM, unsigned long long threshold),
               (fastreg::keep_mask(bits, keep, n, FASTREG_ST, threshold)))

// Register-path instances of the fused op: (K, largest block), as norm.cu's
// layer norm (the block bound sets the register budget, 65536 / threads);
// fastreg/cuda/dropout.py's ROW_KERNELS table mirrors these lines.
FASTREG_LN_FWD(__half, float, f16, 1, 1024)
FASTREG_LN_FWD(__half, float, f16, 2, 512)
FASTREG_LN_BWD(__half, float, f16, 1, 512)
FASTREG_LN_BWD(__half, float, f16, 2, 512)
FASTREG_LN_FWD(__nv_bfloat16, float, bf16, 1, 1024)
FASTREG_LN_FWD(__nv_bfloat16, float, bf16, 2, 512)
FASTREG_LN_BWD(__nv_bfloat16, float, bf16, 1, 512)
FASTREG_LN_BWD(__nv_bfloat16, float, bf16, 2, 512)
FASTREG_LN_FWD(float, float, f32, 1, 1024)
FASTREG_LN_FWD(float, float, f32, 4, 1024)
FASTREG_LN_BWD(float, float, f32, 1, 512)
FASTREG_LN_BWD(float, float, f32, 4, 512)
FASTREG_LN_FWD(double, double, f64, 1, 1024)
FASTREG_LN_FWD(double, double, f64, 4, 1024)
FASTREG_LN_BWD(double, double, f64, 1, 512)
FASTREG_LN_BWD(double, double, f64, 2, 512)
