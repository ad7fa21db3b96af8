// Group norm (and instance norm, G = C) forward and backward.
//
//   forward   sample n's group g: the channels [g*Cg, (g+1)*Cg) (Cg = C / G) at
//             all HW spatial positions, m = Cg * HW values;
//             y = (x - mean) * rstd * w[c] + b[c],  rstd = 1 / sqrt(var + eps) (biased var)
//   backward  g = dy * w[c], xhat = (x - mean) * rstd, means over the group:
//             dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//                = alpha[c] * dy - beta * (x - mean) - gamma,
//             alpha = rstd * w[c], beta = rstd^3 * sum(g * (x - mean)) / m,
//             gamma = rstd * sum(g) / m;
//             dweight[c] = sum over n of rstd * sum(dy * (x - mean)), dbias[c] = sum(dy)
//
// T is the storage type, A = Acc<T> (float; double for double): every sum and
// the statistics (returned as A) are in A.
//
// Strategy:
// - groups (channels first, H*W > 1: NCHW): one block per (n, g), whose data is
//   one contiguous run of m elements. R threads per channel (a power of two,
//   32..blockDim, from H*W), blockDim / R channels at a time, so each thread
//   knows its channel without a division. Pass 1: shifted sums (shift k = the
//   group's first element) into a block Welford merge (warp butterflies, then
//   warps in order); pass 2 writes y from (x - k) - (mean - k), which keeps the
//   digits of a mean far from 0. Pass 2 re-reads the run, from L2: the runs of
//   the resident blocks (2 blocks of 512 threads per SM with <= 64 registers:
//   264 x 100 KB = 26 MB for 32x256x56x56 float32 with G = 32) fit in the
//   50 MB L2, so memory sees x read once and y written once. Backward: pass 1
//   sums dy and dy * (x - mean) channel by channel (row-group sums, fixed
//   order), writes them as the (n, c) partials of dweight/dbias and adds
//   w[c] times them into the group's sums; pass 2 writes dx; a second kernel
//   adds the partials over n in order.
// - rows (channels last: NHWC, channels_last storage, (N, C)): x as (N, HW, C),
//   the row kernels of channel_norm.cuh with O = N outer slices and W = Cg
//   columns per group: per-column partials over row splits, a per-group merge
//   in double, per-(n, column) coefficients, then the apply pass (reverse
//   block order, so it starts on what is still in L2).
//
// Bytes. Minimal: forward 2 * numel * sizeof(T) (+ params, stats); backward
// 3 * numel * sizeof(T). Groups path: the minimal bytes when the second reads
// hit L2 as above; expected ~2600-2800 GB/s forward and ~2500-2700 backward
// over the minimal bytes on an H100 (copy ceiling ~3000; torch 1238-1259 /
// 1110-1343 for NCHW). Rows path: x is read twice (the statistics of a group
// span a whole sample, 3.2 MB at 56x56x256 float32, too much to keep on one
// SM), minus what the apply pass finds in L2: for 32x256x56x56 float32 (103
// MB) ~2100-2300 GB/s (torch 550), for bfloat16 (51 MB, mostly in L2)
// ~2400-2700 (torch 310). Keeping a sample's tile on chip across a thread-block
// cluster (sm_90 distributed shared memory) would remove the second read.
//
// Order: fixed by the shapes and the launch geometry (chosen from the shapes by
// fastreg/cuda/_group_norm.py): bitwise identical run to run. No atomics.
// Limits: N * G blocks < 2^31 (groups path), N <= 65535 (rows path, grid.z);
// m < 2^31.
#include "channel_norm.cuh"

namespace fastreg {

// ------------------------------------------------------------------ groups: forward
// Grid: N * G blocks (block = group n * G + g); mean, rstd, var: N * G values of A.
template <typename T, bool VEC>
__device__ __forceinline__ void group_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                          const T* __restrict__ b, T* __restrict__ y,
                                          typename Acc<T>::type* __restrict__ mean,
                                          typename Acc<T>::type* __restrict__ rstd,
                                          typename Acc<T>::type* __restrict__ var, int G, int Cg,
                                          int HW, typename Acc<T>::type eps, int R) {
  typedef typename Acc<T>::type A;
  enum { N = Vec<T>::N, NV = VEC ? Vec<T>::N : 1 };
  __shared__ A scratch[3 * 32];
  const int t = threadIdx.x, lane = t & (R - 1), row = t / R, CPB = blockDim.x / R;
  const int U = HW / NV;
  const long long blk = blockIdx.x, base = blk * Cg * HW;
  const int g = int(blk % G);
  const A k = to_acc(x[base]);
  A s1[N], s2[N];
#pragma unroll
  for (int i = 0; i < N; ++i) s1[i] = s2[i] = A(0);
  A cnt = A(0);
  for (int cb = 0; cb < Cg; cb += CPB) {
    const int ci = cb + row;
    if (ci >= Cg) continue;
    const T* xc = x + base + (long long)ci * HW;
#pragma unroll 4
    for (int u = lane; u < U; u += R) {
      A v[N];
      load_unit<VEC, false>(xc + (long long)u * NV, v);
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const A d = v[i] - k;
        s1[i] += d;
        s2[i] += d * d;
      }
      cnt += A(NV);
    }
  }
#pragma unroll
  for (int i = 1; i < NV; ++i) {
    s1[0] += s1[i];
    s2[0] += s2[i];
  }
  const Welford<A> st = block_welford(shifted_to_welford(cnt, s1[0], s2[0]), scratch);
  const A ms = st.mean, v = st.n > A(0) ? st.m2 / st.n : A(0), r = rsqrt_acc(v + eps);
  if (t == 0) {
    mean[blk] = k + ms;
    rstd[blk] = r;
    var[blk] = v;
  }
  for (int cb = 0; cb < Cg; cb += CPB) {
    const int ci = cb + row;
    if (ci >= Cg) continue;
    const int c = g * Cg + ci;
    const A sc = r * (w != nullptr ? to_acc(w[c]) : A(1)), sf = b != nullptr ? to_acc(b[c]) : A(0);
    const long long off = base + (long long)ci * HW;
#pragma unroll 4
    for (int u = lane; u < U; u += R) {
      A xv[N];
      load_unit<VEC, true>(x + off + (long long)u * NV, xv);
#pragma unroll
      for (int i = 0; i < NV; ++i) xv[i] = ((xv[i] - k) - ms) * sc + sf;
      store_unit<VEC>(y + off + (long long)u * NV, xv);
    }
  }
}

// ------------------------------------------------------------------ groups: backward
// part: (2, N, 1, C) of A: sum(dy), sum(dy * (x - mean)) per (n, c), for group_params.
template <typename T, bool VEC>
__device__ __forceinline__ void group_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                                          const typename Acc<T>::type* __restrict__ mean,
                                          const typename Acc<T>::type* __restrict__ rstd,
                                          const T* __restrict__ w, T* __restrict__ dx,
                                          typename Acc<T>::type* __restrict__ part, int G, int Cg,
                                          int HW, int R) {
  typedef typename Acc<T>::type A;
  enum { N = Vec<T>::N, NV = VEC ? Vec<T>::N : 1 };
  __shared__ A scratch[2][2 * 32];
  __shared__ A totals[2][32];
  const int t = threadIdx.x, lane = t & (R - 1), row = t / R, CPB = blockDim.x / R;
  const int U = HW / NV, C = G * Cg;
  const long long blk = blockIdx.x, base = blk * Cg * HW, n = blk / G;
  const long long plane = (long long)gridDim.x * Cg;  // N * C
  const int g = int(blk % G);
  const A mu = mean[blk], r = rstd[blk];
  A lead[2] = {A(0), A(0)};  // row leader: sum over its channels of w[c] * (channel sums)
  int parity = 0;
  for (int cb = 0; cb < Cg; cb += CPB, parity ^= 1) {
    const int ci = cb + row;
    A s[2] = {A(0), A(0)};
    if (ci < Cg) {
      const long long off = base + (long long)ci * HW;
      A sg[N], sgx[N];
#pragma unroll
      for (int i = 0; i < N; ++i) sg[i] = sgx[i] = A(0);
#pragma unroll 4
      for (int u = lane; u < U; u += R) {
        A gv[N], xv[N];
        load_unit<VEC, false>(dy + off + (long long)u * NV, gv);
        load_unit<VEC, false>(x + off + (long long)u * NV, xv);
#pragma unroll
        for (int i = 0; i < NV; ++i) {
          sg[i] += gv[i];
          sgx[i] += gv[i] * (xv[i] - mu);
        }
      }
      s[0] = sg[0];
      s[1] = sgx[0];
#pragma unroll
      for (int i = 1; i < NV; ++i) {
        s[0] += sg[i];
        s[1] += sgx[i];
      }
    }
    group_sum(s, R, scratch[parity]);  // every thread: the trip count is the same for all
    if (lane == 0 && ci < Cg) {
      const int c = g * Cg + ci;
      part[n * C + c] = s[0];
      part[plane + n * C + c] = s[1];
      const A wv = w != nullptr ? to_acc(w[c]) : A(1);
      lead[0] += wv * s[0];
      lead[1] += wv * s[1];
    }
  }
  if (lane == 0) {
    totals[0][row] = lead[0];
    totals[1][row] = lead[1];
  }
  __syncthreads();
  A sg = totals[0][0], sgx = totals[1][0];
  for (int j = 1; j < CPB; ++j) {  // the rows' channel sets in row order
    sg += totals[0][j];
    sgx += totals[1][j];
  }
  const A m = A(Cg) * A(HW);
  const A beta = r * r * r * sgx / m, gamma = r * sg / m;
  for (int cb = 0; cb < Cg; cb += CPB) {
    const int ci = cb + row;
    if (ci >= Cg) continue;
    const int c = g * Cg + ci;
    const A alpha = r * (w != nullptr ? to_acc(w[c]) : A(1));
    const long long off = base + (long long)ci * HW;
#pragma unroll 4
    for (int u = lane; u < U; u += R) {
      A gv[N], xv[N];
      load_unit<VEC, true>(dy + off + (long long)u * NV, gv);
      load_unit<VEC, true>(x + off + (long long)u * NV, xv);
#pragma unroll
      for (int i = 0; i < NV; ++i) xv[i] = alpha * gv[i] - beta * (xv[i] - mu) - gamma;
      store_unit<VEC>(dx + off + (long long)u * NV, xv);
    }
  }
}

// ------------------------------------------------------------------ rows: backward coefficients
// Warp per (n, g): sg = sum over (split s, column j of g) of w[j] * part0, sgx likewise
// with part1 (part: (2, N, S, C) from rows_bwd_reduce, sums about the mean), lanes in
// item order then a butterfly, in double; then coef (4, N, C) for the group's columns:
// mean, alpha = rstd * w[j], beta = rstd^3 * sgx / m, gamma = rstd * sg / m.
template <typename T>
__device__ __forceinline__ void group_bwd_coef(const typename Acc<T>::type* __restrict__ part,
                                               const typename Acc<T>::type* __restrict__ mean,
                                               const typename Acc<T>::type* __restrict__ rstd,
                                               const T* __restrict__ w, int Nn, int S, int G,
                                               int Cg, int HW,
                                               typename Acc<T>::type* __restrict__ coef) {
  typedef typename Acc<T>::type A;
  const long long gw = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (gw >= (long long)Nn * G) return;
  const int lane = threadIdx.x & 31, n = int(gw / G), g = int(gw % G), C = G * Cg;
  const long long plane = (long long)Nn * S * C;
  double sg = 0.0, sgx = 0.0;
  for (int p = lane; p < S * Cg; p += 32) {
    const int c = g * Cg + p % Cg;
    const long long i = ((long long)n * S + p / Cg) * C + c;
    const double wv = w != nullptr ? double(to_acc(w[c])) : 1.0;
    sg += wv * double(part[i]);
    sgx += wv * double(part[plane + i]);
  }
  sg = warp_sum(sg);
  sgx = warp_sum(sgx);
  const double r = rstd[gw], m = double(Cg) * double(HW);
  const A beta = A(r * r * r * sgx / m), gamma = A(r * sg / m);
  const long long total = (long long)Nn * C;
  for (int jj = lane; jj < Cg; jj += 32) {
    const long long j = (long long)n * C + g * Cg + jj;
    const double wv = w != nullptr ? double(to_acc(w[g * Cg + jj])) : 1.0;
    coef[j] = mean[gw];
    coef[total + j] = A(r * wv);
    coef[2 * total + j] = beta;
    coef[3 * total + j] = gamma;
  }
}

// ------------------------------------------------------------------ dweight, dbias
// One thread per channel c: dweight[c] = sum over n (in order) of
// rstd[n, c / Cg] * (sum over s of part1[n, s, c]), dbias[c] = sum of part0, in double.
template <typename T>
__device__ __forceinline__ void group_params(const typename Acc<T>::type* __restrict__ part,
                                             const typename Acc<T>::type* __restrict__ rstd,
                                             int Nn, int S, int C, int Cg,
                                             T* __restrict__ dweight, T* __restrict__ dbias) {
  typedef typename Acc<T>::type A;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const long long plane = (long long)Nn * S * C;
  const int G = C / Cg;
  double dw = 0.0, db = 0.0;
  for (int n = 0; n < Nn; ++n) {
    double sdy = 0.0, sdx = 0.0;
    for (int s = 0; s < S; ++s) {
      const long long i = ((long long)n * S + s) * C + c;
      sdy += double(part[i]);
      sdx += double(part[plane + i]);
    }
    dw += double(rstd[(long long)n * G + c / Cg]) * sdx;
    db += sdy;
  }
  if (dweight != nullptr) dweight[c] = from_acc<T>(A(dw));
  if (dbias != nullptr) dbias[c] = from_acc<T>(A(db));
}

}  // namespace fastreg

// ------------------------------------------------------------------ instances
// fastreg/cuda/_group_norm.py names these. The groups kernels take up to 512
// threads; the others 256.
#define FASTREG_GN_INSTANCES(T, A, tag)                                                        \
  FASTREG_KERNEL(group_norm_fwd_##tag##_groups, 512,                                           \
                 (const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,   \
                  T* __restrict__ y, A* __restrict__ mean, A* __restrict__ rstd,               \
                  A* __restrict__ var, int G, int Cg, int HW, A eps, int R, int vec),          \
                 FASTREG_CN_BY_VEC(group_fwd, (T),                                             \
                                   (x, w, b, y, mean, rstd, var, G, Cg, HW, eps, R)))          \
  FASTREG_KERNEL(group_norm_bwd_##tag##_groups, 512,                                           \
                 (const T* __restrict__ dy, const T* __restrict__ x,                           \
                  const A* __restrict__ mean, const A* __restrict__ rstd,                      \
                  const T* __restrict__ w, T* __restrict__ dx, A* __restrict__ part, int G,    \
                  int Cg, int HW, int R, int vec),                                             \
                 FASTREG_CN_BY_VEC(group_bwd, (T),                                             \
                                   (dy, x, mean, rstd, w, dx, part, G, Cg, HW, R)))            \
  FASTREG_KERNEL(group_norm_fwd_##tag##_stats_rows, 256,                                       \
                 (const T* __restrict__ x, A* __restrict__ part, int R, int K, int W,          \
                  int rows_per_split, int TC, int vec),                                        \
                 FASTREG_CN_BY_VEC(rows_stats, (T, A), (x, part, R, K, W, rows_per_split, TC))) \
  FASTREG_KERNEL(group_norm_fwd_##tag##_stats_merge, 256,                                            \
                 (const T* __restrict__ x, const A* __restrict__ part, int O, int S, int K,    \
                  int W, long long shift_outer, int shift_group, double* __restrict__ count,   \
                  double* __restrict__ mean, double* __restrict__ m2),                         \
                 (fastreg::merge_stats<T, A>(x, part, O, S, K, W, shift_outer, shift_group,    \
                                             count, mean, m2)))                                \
  FASTREG_KERNEL(group_norm_fwd_##tag##_coef, 256,                                             \
                 (const double* __restrict__ count, const double* __restrict__ mean,           \
                  const double* __restrict__ stat, int training, const T* __restrict__ w,      \
                  const T* __restrict__ b, double eps, int O, int G, int W, int per_column,    \
                  A* __restrict__ mean_out, A* __restrict__ rstd_out,                          \
                  double* __restrict__ var_out, A* __restrict__ coef),                         \
                 (fastreg::fwd_coef<T>(count, mean, stat, training, w, b, eps, O, G, W,        \
                                       per_column, mean_out, rstd_out, var_out, coef)))        \
  FASTREG_KERNEL(group_norm_fwd_##tag##_apply_rows, 256,                                       \
                 (const T* __restrict__ x, const A* __restrict__ coef, T* __restrict__ y,      \
                  int R, int K, int rows_per_split, int TC, int relu, int vec),                \
                 FASTREG_CN_BY_VEC(rows_apply, (T),                                            \
                                   (x, coef, y, R, K, rows_per_split, TC, relu)))              \
  FASTREG_KERNEL(group_norm_bwd_##tag##_reduce_rows, 256,                                      \
                 (const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,  \
                  const A* __restrict__ center, A* __restrict__ part, int R, int K, int W,     \
                  int rows_per_split, int TC, int vec),                                        \
                 FASTREG_CN_BY_VEC(rows_bwd_reduce, (T, A),                                    \
                                   (dy, x, y, center, part, R, K, W, rows_per_split, TC)))     \
  FASTREG_KERNEL(group_norm_bwd_##tag##_coef, 256,                                             \
                 (const A* __restrict__ part, const A* __restrict__ mean,                      \
                  const A* __restrict__ rstd, const T* __restrict__ w, int Nn, int S, int G,   \
                  int Cg, int HW, A* __restrict__ coef),                                       \
                 (fastreg::group_bwd_coef<T>(part, mean, rstd, w, Nn, S, G, Cg, HW, coef)))    \
  FASTREG_KERNEL(group_norm_bwd_##tag##_apply_rows, 256,                                       \
                 (const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ y,  \
                  const A* __restrict__ coef, T* __restrict__ dx, int R, int K,                \
                  int rows_per_split, int TC, int vec),                                        \
                 FASTREG_CN_BY_VEC(rows_bwd_apply, (T),                                        \
                                   (dy, x, y, coef, dx, R, K, rows_per_split, TC)))            \
  FASTREG_KERNEL(group_norm_bwd_##tag##_params, 256,                                           \
                 (const A* __restrict__ part, const A* __restrict__ rstd, int Nn, int S,       \
                  int C, int Cg, T* __restrict__ dweight, T* __restrict__ dbias),              \
                 (fastreg::group_params<T>(part, rstd, Nn, S, C, Cg, dweight, dbias)))

FASTREG_GN_INSTANCES(__half, float, f16)
FASTREG_GN_INSTANCES(__nv_bfloat16, float, bf16)
FASTREG_GN_INSTANCES(float, float, f32)
FASTREG_GN_INSTANCES(double, double, f64)
