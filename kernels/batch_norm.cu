// Batch norm forward and backward, and the split steps of a batch spread
// over processes (statistics, their merge, backward sums, dx).
//
//   forward   y = act((x - mean) * rstd * w + b),  rstd = 1 / sqrt(var + eps)
//             mean, var (biased) per channel over every axis but the channel
//             axis (training), or the given running statistics (inference)
//   backward  dz = dy * (y > 0) with the fused ReLU (y the saved output), else dy
//             dbias = sum(dz), dweight = rstd * sum(dz * (x - mean))
//             dx = alpha * dz - beta * (x - mean) - gamma, alpha = rstd * w,
//             beta = alpha * rstd * dweight / n, gamma = alpha * dbias / n
//             (training; beta = gamma = 0 in inference)
//
// x is viewed as (A, C, B) around the channel axis (fastreg/cuda/_layout.py):
// NCHW gives (N, C, H*W), NHWC, channels_last storage and (N, C) give
// (rows, C, 1). T is the storage type (__half, __nv_bfloat16, float,
// double), A = Acc<T> (float; double for double). Statistics are returned in
// A; the split steps keep float64 partials and statistics for every T (their
// partials are accumulated in P = double).
//
// Strategy (channel_norm.cuh has the building blocks and the reduction order):
// - chunks (B * sizeof(T) >= 32, e.g. NCHW): grid (C, S), block (c, s)
//   reduces the s-th of S ranges of channel c's units (16-byte vectors when
//   B is a multiple of 16 / sizeof(T) and the arrays are 16-byte aligned).
//   Several blocks per channel (S, set from the shape by the launcher, about
//   2048 blocks in all) keep every SM streaming when N*H*W is large.
// - rows (B * sizeof(T) < 32: NHWC, (N, C), tiny maps): x as (A, C*B) rows,
//   blocks over row ranges with per-column vector accumulators.
// Training forward: statistics partials -> merge (per channel, in double) ->
// coefficients -> apply. Backward: sums partials -> merge -> coefficients
// (and dweight, dbias) -> dx. The apply passes run their grid in reverse
// block order so their first reads hit what the first pass left in L2.
//
// Bytes. Minimal: forward reads x and writes y (2 * numel * sizeof(T));
// backward reads dy, x (+ y with ReLU) and writes dx (3 * numel * sizeof(T)).
// Moved: the training forward reads x twice (statistics, then y: the
// statistics are global over the batch, so nothing can be normalized before
// every element is read), the backward reads dy and x twice; partials add
// 3 * S * C (forward) or 2 * S * C (backward) values of P, < 1%. The second
// read hits L2 for the part of x (up to ~30-50 MB on an H100) the first pass
// read last. Expected bound on an H100 (copy ceiling ~3000 GB/s; GB/s over
// the minimal bytes): training forward 2 * 3000 / (3 - L2 share) ~ 2000-2150
// GB/s for 256x64x56x56 float32 (205 MB; torch 845) and ~2100-2400 for
// bfloat16 (103 MB, a larger L2 share; torch 229); inference forward ~2900
// (one read, one write); training backward 3 * 3000 / (5 - L2 share) ~
// 1800-1900 (torch 508). NHWC moves the same bytes, so the same bounds hold
// there: about 1.1-1.2x torch's 1632-1867 forward and ~1.05x its 1670-1760
// backward; the second read of x (and dy) is what bounds them.
//
// Limits: C and S per grid as in channel_norm.cuh; the units of one channel
// (A * B / NV) < 2^31; A * C * B < 2^62. The launchers check them.
#include "channel_norm.cuh"

namespace fastreg {

// ------------------------------------------------------------------ chunks: geometry
// Split s of S of channel c covers units [s * per, (s + 1) * per) of the
// channel's A * U units (unit u: row u / U, vector u % U of the row's chunk);
// thread t takes units t, t + blockDim, ...: one division at the start, then
// additions (the row and the unit within it advance by fixed steps).
struct ChunkWalk {
  long long i, end;
  int r, v, dr, dv;
};

__device__ __forceinline__ ChunkWalk chunk_walk(int Arows, int U, int s, int S) {
  ChunkWalk w;
  const long long units = (long long)Arows * U, per = (units + S - 1) / S;
  const long long u0 = (long long)s * per;
  w.end = u0 + per < units ? u0 + per : units;
  w.i = u0 + threadIdx.x;
  w.r = int(w.i / U);
  w.v = int(w.i % U);
  w.dr = int(blockDim.x) / U;
  w.dv = int(blockDim.x) % U;
  return w;
}

__device__ __forceinline__ void chunk_next(ChunkWalk& w, int U) {
  w.i += blockDim.x;
  w.v += w.dv;
  w.r += w.dr;
  if (w.v >= U) {
    w.v -= U;
    ++w.r;
  }
}

__device__ __forceinline__ long long chunk_offset(const ChunkWalk& w, int C, int c, int B, int NV) {
  return ((long long)w.r * C + c) * B + (long long)w.v * NV;
}

// ------------------------------------------------------------------ chunks: statistics
// part: (3, S, C) of P, triples (n, mean - k, M2), k = x[0, c, 0].
template <typename T, typename P, bool VEC>
__device__ __forceinline__ void chunk_stats(const T* __restrict__ x, P* __restrict__ part,
                                            int Arows, int C, int B) {
  typedef typename Acc<T>::type A;
  enum { N = Vec<T>::N, NV = VEC ? Vec<T>::N : 1 };
  __shared__ P scratch[3 * 32];
  const int c = blockIdx.x, s = blockIdx.y, S = gridDim.y, U = B / NV;
  const P k = P(to_acc(x[(long long)c * B]));
  P s1[N], s2[N];
#pragma unroll
  for (int i = 0; i < N; ++i) s1[i] = s2[i] = P(0);
  P cnt = P(0);
  ChunkWalk w = chunk_walk(Arows, U, s, S);
#pragma unroll 4
  for (; w.i < w.end; chunk_next(w, U)) {
    A v[N];
    load_unit<VEC, false>(x + chunk_offset(w, C, c, B, NV), v);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const P d = P(v[i]) - k;
      s1[i] += d;
      s2[i] += d * d;
    }
    cnt += P(NV);
  }
#pragma unroll
  for (int i = 1; i < NV; ++i) {
    s1[0] += s1[i];
    s2[0] += s2[i];
  }
  const Welford<P> st = block_welford(shifted_to_welford(cnt, s1[0], s2[0]), scratch);
  if (threadIdx.x == 0) {
    part[(long long)s * C + c] = st.n;
    part[((long long)S + s) * C + c] = st.mean;
    part[((long long)2 * S + s) * C + c] = st.m2;
  }
}

// ------------------------------------------------------------------ chunks: apply
// coef: (3, C) of A (mean, scale, shift). Blocks in reverse order (L2 reuse).
template <typename T, bool VEC>
__device__ __forceinline__ void chunk_apply(const T* __restrict__ x,
                                            const typename Acc<T>::type* __restrict__ coef,
                                            T* __restrict__ y, int Arows, int C, int B, int relu) {
  typedef typename Acc<T>::type A;
  enum { N = Vec<T>::N, NV = VEC ? Vec<T>::N : 1 };
  const int c = gridDim.x - 1 - blockIdx.x, s = gridDim.y - 1 - blockIdx.y, U = B / NV;
  const A mu = coef[c], sc = coef[C + c], sf = coef[2 * C + c];
  ChunkWalk w = chunk_walk(Arows, U, s, gridDim.y);
#pragma unroll 4
  for (; w.i < w.end; chunk_next(w, U)) {
    const long long off = chunk_offset(w, C, c, B, NV);
    A v[N];
    load_unit<VEC, true>(x + off, v);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      v[i] = (v[i] - mu) * sc + sf;
      if (relu && v[i] < A(0)) v[i] = A(0);
    }
    store_unit<VEC>(y + off, v);
  }
}

// ------------------------------------------------------------------ chunks: backward sums
// part: (2, S, C) of P: sum(dz), sum(dz * (x - center[c])).
template <typename T, typename P, bool VEC>
__device__ __forceinline__ void chunk_bwd_reduce(const T* __restrict__ dy, const T* __restrict__ x,
                                                 const T* __restrict__ y,
                                                 const P* __restrict__ center,
                                                 P* __restrict__ part, int Arows, int C, int B) {
  typedef typename Acc<T>::type A;
  enum { N = Vec<T>::N, NV = VEC ? Vec<T>::N : 1 };
  __shared__ P scratch[2 * 32];
  const int c = blockIdx.x, s = blockIdx.y, S = gridDim.y, U = B / NV;
  const P mu = center[c];
  P sg[N], sgx[N];
#pragma unroll
  for (int i = 0; i < N; ++i) sg[i] = sgx[i] = P(0);
  ChunkWalk w = chunk_walk(Arows, U, s, S);
#pragma unroll 4
  for (; w.i < w.end; chunk_next(w, U)) {
    const long long off = chunk_offset(w, C, c, B, NV);
    A g[N], v[N];
    load_dz<VEC>(dy, y, off, g);
    load_unit<VEC, false>(x + off, v);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      sg[i] += P(g[i]);
      sgx[i] += P(g[i]) * (P(v[i]) - mu);
    }
  }
  P t[2] = {sg[0], sgx[0]};
#pragma unroll
  for (int i = 1; i < NV; ++i) {
    t[0] += sg[i];
    t[1] += sgx[i];
  }
  group_sum(t, blockDim.x, scratch);
  if (threadIdx.x == 0) {
    part[(long long)s * C + c] = t[0];
    part[((long long)S + s) * C + c] = t[1];
  }
}

// ------------------------------------------------------------------ chunks: dx
// coef: (4, C) of A (mean, alpha, beta, gamma). Blocks in reverse order.
template <typename T, bool VEC>
__device__ __forceinline__ void chunk_bwd_apply(const T* __restrict__ dy, const T* __restrict__ x,
                                                const T* __restrict__ y,
                                                const typename Acc<T>::type* __restrict__ coef,
                                                T* __restrict__ dx, int Arows, int C, int B) {
  typedef typename Acc<T>::type A;
  enum { N = Vec<T>::N, NV = VEC ? Vec<T>::N : 1 };
  const int c = gridDim.x - 1 - blockIdx.x, s = gridDim.y - 1 - blockIdx.y, U = B / NV;
  const A mu = coef[c], al = coef[C + c], be = coef[2 * C + c], ga = coef[3 * C + c];
  ChunkWalk w = chunk_walk(Arows, U, s, gridDim.y);
#pragma unroll 4
  for (; w.i < w.end; chunk_next(w, U)) {
    const long long off = chunk_offset(w, C, c, B, NV);
    A g[N], v[N];
    load_dz<VEC>(dy, y, off, g);
    load_unit<VEC, true>(x + off, v);
#pragma unroll
    for (int i = 0; i < NV; ++i) v[i] = al * g[i] - be * (v[i] - mu) - ga;
    store_unit<VEC>(dx + off, v);
  }
}

// ------------------------------------------------------------------ backward coefficients
// One thread per column j of C * W (channel c = j / W), in double:
//   alpha = rstd * w, beta = alpha * rstd * sum_dy_xhat * inv_n, gamma = alpha * sum_dy * inv_n
// (beta = gamma = 0 in inference), mean rounded to A with gamma taking up the
// rounding. The channel's first column writes dweight = sum_dy_xhat and
// dbias = sum_dy where given.
template <typename T>
__device__ __forceinline__ void bwd_coef(const double* __restrict__ sum_dy,
                                         const double* __restrict__ sum_dy_xhat,
                                         const double* __restrict__ mean,
                                         const double* __restrict__ rstd, const T* __restrict__ w,
                                         double inv_n, int training, int C, int W,
                                         T* __restrict__ dweight, T* __restrict__ dbias,
                                         typename Acc<T>::type* __restrict__ coef) {
  typedef typename Acc<T>::type A;
  const long long total = (long long)C * W;
  const long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= total) return;
  const int c = int(j / W);
  const double r = rstd[c], alpha = r * (w != nullptr ? double(to_acc(w[c])) : 1.0);
  const double beta = training ? alpha * r * sum_dy_xhat[c] * inv_n : 0.0;
  double gamma = training ? alpha * sum_dy[c] * inv_n : 0.0;
  const A mu_a = A(mean[c]);
  gamma += (double(mu_a) - mean[c]) * beta;
  coef[j] = mu_a;
  coef[total + j] = A(alpha);
  coef[2 * total + j] = A(beta);
  coef[3 * total + j] = A(gamma);
  if (j % W == 0) {
    if (dweight != nullptr) dweight[c] = from_acc<T>(A(sum_dy_xhat[c]));
    if (dbias != nullptr) dbias[c] = from_acc<T>(A(sum_dy[c]));
  }
}

// ------------------------------------------------------------------ split: merge across processes
// Chan's pairwise merge of R processes' (count, mean, M2), one thread per
// channel, processes in index order; a process with count 0 is skipped.
__device__ __forceinline__ void combine(const double* __restrict__ counts,
                                        const double* __restrict__ means,
                                        const double* __restrict__ m2s, int R, int C,
                                        double* __restrict__ count, double* __restrict__ mean,
                                        double* __restrict__ var) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double n = 0.0, mu = 0.0, s = 0.0;
  for (int r = 0; r < R; ++r) {
    const long long i = (long long)r * C + c;
    const double nb = counts[i];
    if (nb == 0.0) continue;
    const double tot = n + nb, delta = means[i] - mu, frac = nb / tot;
    mu += delta * frac;
    s += m2s[i] + delta * delta * n * frac;
    n = tot;
  }
  count[c] = n;
  mean[c] = mu;
  var[c] = n > 0.0 ? s / n : 0.0;
}

}  // namespace fastreg

// ------------------------------------------------------------------ instances
// fastreg/cuda/_batch_norm.py names these; every block has 256 threads.
#define FASTREG_BN_STATS(name, T, P)                                                           \
  FASTREG_KERNEL(name##_chunks, 256,                                                           \
                 (const T* __restrict__ x, P* __restrict__ part, int Arows, int C, int B,      \
                  int vec),                                                                    \
                 FASTREG_CN_BY_VEC(chunk_stats, (T, P), (x, part, Arows, C, B)))               \
  FASTREG_KERNEL(name##_rows, 256,                                                             \
                 (const T* __restrict__ x, P* __restrict__ part, int R, int K, int W,          \
                  int rows_per_split, int TC, int vec),                                        \
                 FASTREG_CN_BY_VEC(rows_stats, (T, P), (x, part, R, K, W, rows_per_split, TC))) \
  FASTREG_KERNEL(name##_merge, 256,                                                            \
                 (const T* __restrict__ x, const P* __restrict__ part, int O, int S, int K,    \
                  int W, long long shift_outer, int shift_group, double* __restrict__ count,   \
                  double* __restrict__ mean, double* __restrict__ m2),                         \
                 (fastreg::merge_stats<T, P>(x, part, O, S, K, W, shift_outer, shift_group,    \
                                             count, mean, m2)))
#define FASTREG_BN_REDUCE(name, T, P)                                                          \
  FASTREG_KERNEL(name##_chunks, 256,                                                           \
                 (const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,  \
                  const P* __restrict__ center, P* __restrict__ part, int Arows, int C, int B, \
                  int vec),                                                                    \
                 FASTREG_CN_BY_VEC(chunk_bwd_reduce, (T, P),                                   \
                                   (dy, x, y, center, part, Arows, C, B)))                     \
  FASTREG_KERNEL(name##_rows, 256,                                                             \
                 (const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,  \
                  const P* __restrict__ center, P* __restrict__ part, int R, int K, int W,     \
                  int rows_per_split, int TC, int vec),                                        \
                 FASTREG_CN_BY_VEC(rows_bwd_reduce, (T, P),                                    \
                                   (dy, x, y, center, part, R, K, W, rows_per_split, TC)))

#define FASTREG_BN_INSTANCES(T, A, tag)                                                        \
  FASTREG_BN_STATS(batch_norm_fwd_##tag##_stats, T, A)                                         \
  FASTREG_KERNEL(batch_norm_fwd_##tag##_coef, 256,                                             \
                 (const double* __restrict__ count, const double* __restrict__ mean,           \
                  const double* __restrict__ stat, int training, const T* __restrict__ w,      \
                  const T* __restrict__ b, double eps, int O, int G, int W, int per_column,    \
                  A* __restrict__ mean_out, A* __restrict__ rstd_out,                          \
                  double* __restrict__ var_out, A* __restrict__ coef),                         \
                 (fastreg::fwd_coef<T>(count, mean, stat, training, w, b, eps, O, G, W,        \
                                       per_column, mean_out, rstd_out, var_out, coef)))        \
  FASTREG_KERNEL(batch_norm_fwd_##tag##_apply_chunks, 256,                                     \
                 (const T* __restrict__ x, const A* __restrict__ coef, T* __restrict__ y,      \
                  int Arows, int C, int B, int relu, int vec),                                 \
                 FASTREG_CN_BY_VEC(chunk_apply, (T), (x, coef, y, Arows, C, B, relu)))         \
  FASTREG_KERNEL(batch_norm_fwd_##tag##_apply_rows, 256,                                       \
                 (const T* __restrict__ x, const A* __restrict__ coef, T* __restrict__ y,      \
                  int R, int K, int rows_per_split, int TC, int relu, int vec),                \
                 FASTREG_CN_BY_VEC(rows_apply, (T),                                            \
                                   (x, coef, y, R, K, rows_per_split, TC, relu)))              \
  FASTREG_BN_REDUCE(batch_norm_bwd_##tag##_reduce, T, A)                                       \
  FASTREG_KERNEL(batch_norm_bwd_##tag##_coef, 256,                                             \
                 (const double* __restrict__ sum_dy, const double* __restrict__ sum_dy_xhat,   \
                  const double* __restrict__ mean, const double* __restrict__ rstd,            \
                  const T* __restrict__ w, double inv_n, int training, int C, int W,           \
                  T* __restrict__ dweight, T* __restrict__ dbias, A* __restrict__ coef),       \
                 (fastreg::bwd_coef<T>(sum_dy, sum_dy_xhat, mean, rstd, w, inv_n, training, C, \
                                       W, dweight, dbias, coef)))                              \
  FASTREG_KERNEL(batch_norm_bwd_##tag##_apply_chunks, 256,                                     \
                 (const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,  \
                  const A* __restrict__ coef, T* __restrict__ dx, int Arows, int C, int B,     \
                  int vec),                                                                    \
                 FASTREG_CN_BY_VEC(chunk_bwd_apply, (T), (dy, x, y, coef, dx, Arows, C, B)))   \
  FASTREG_KERNEL(batch_norm_bwd_##tag##_apply_rows, 256,                                       \
                 (const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,  \
                  const A* __restrict__ coef, T* __restrict__ dx, int R, int K,                \
                  int rows_per_split, int TC, int vec),                                        \
                 FASTREG_CN_BY_VEC(rows_bwd_apply, (T),                                        \
                                   (dy, x, y, coef, dx, R, K, rows_per_split, TC)))

// The split steps' float64 partials, for the types whose A is float (for
// double the batch_norm_fwd/bwd_f64 kernels above already accumulate in double).
#define FASTREG_BN_SPLIT_INSTANCES(T, tag)                                                     \
  FASTREG_BN_STATS(batch_norm_stats_##tag, T, double)                                          \
  FASTREG_BN_REDUCE(batch_norm_backward_reduce_##tag, T, double)

FASTREG_BN_INSTANCES(__half, float, f16)
FASTREG_BN_INSTANCES(__nv_bfloat16, float, bf16)
FASTREG_BN_INSTANCES(float, float, f32)
FASTREG_BN_INSTANCES(double, double, f64)
FASTREG_BN_SPLIT_INSTANCES(__half, f16)
FASTREG_BN_SPLIT_INSTANCES(__nv_bfloat16, bf16)
FASTREG_BN_SPLIT_INSTANCES(float, f32)

// Backward sums per channel from the partials (of float or double).
FASTREG_KERNEL(batch_norm_bwd_merge_p32, 256,
               (const float* __restrict__ part, int O, int S, int K, int W,
                const double* __restrict__ scale, double* __restrict__ out0,
                double* __restrict__ out1),
               (fastreg::merge_sums<float>(part, O, S, K, W, scale, out0, out1)))
FASTREG_KERNEL(batch_norm_bwd_merge_p64, 256,
               (const double* __restrict__ part, int O, int S, int K, int W,
                const double* __restrict__ scale, double* __restrict__ out0,
                double* __restrict__ out1),
               (fastreg::merge_sums<double>(part, O, S, K, W, scale, out0, out1)))
FASTREG_KERNEL(batch_norm_combine_f64, 256,
               (const double* __restrict__ counts, const double* __restrict__ means,
                const double* __restrict__ m2s, int R, int C, double* __restrict__ count,
                double* __restrict__ mean, double* __restrict__ var),
               (fastreg::combine(counts, means, m2s, R, C, count, mean, var)))
