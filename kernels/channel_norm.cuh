// Building blocks of the norms over channels (batch, group and instance norm),
// shared by batch_norm.cu and group_norm.cu.
//
// Two views of the data, chosen by the launchers from the memory layout:
//
// - rows: x is (O, R, K): O outer slices (1 for batch norm, N samples for
//   group norm), each of R rows of K contiguous columns. Column j belongs to
//   statistic group g = j / W (batch norm: W = B, the elements a channel owns
//   in a row, 1 for NHWC and (N, C); group norm: W = C / G). Grid (CT, S, O):
//   column tile, row split, outer slice. A block is TR x TC threads (TC a
//   power of two, threads across columns): thread (ty, tx) owns the NV
//   columns j0 = (ct * TC + tx) * NV ... (one 16-byte vector, or one column
//   for the scalar body) and walks rows r0 + ty, r0 + ty + TR, ... of its
//   split; its per-column sums are merged across ty by a pairwise tree in
//   shared memory (fixed pairs), and row ty = 0 writes one partial per
//   (outer, split, column).
// - chunks (batch norm with B >= one 32-byte sector per channel and row,
//   e.g. NCHW): x is (A, C, B) and channel c owns A chunks of B contiguous
//   elements. Grid (C, S): block (c, s) takes the s-th of S equal ranges of
//   the channel's A * B / NV units (16-byte vectors or scalars), thread t the
//   units t, t + blockDim, ... of the range; the block merges its threads
//   (warp butterflies, then warps in order) into one partial per (split, channel).
//
// Statistics (forward). Each thread keeps shifted sums s1 = sum(x - k),
// s2 = sum((x - k)^2) in P (float for 16-bit and float32 input, double for
// float64 input and for the float64 split steps), k = the first element of
// the statistic group (row 0 of the slice, first column of the group), so the
// cancellation in s2 - s1^2/n is bounded by (mean - k)^2 / var, never by
// mean^2 / var; x^2 is never formed in half precision. The thread's state
// becomes a Welford triple (n, mean - k, M2); triples are merged by Chan's
// formula (common.cuh, welford_merge) through the tree of the block, then
// per group by `merge_stats` over (split, column) in a fixed order, in
// double; the merge adds k back in double. Partials keep mean - k, so a mean
// far from 0 loses no digits to the float partials.
//
// Backward sums: sum(dz) and sum(dz * (x - center)) per column (center = the
// given mean), summed the same way (`merge_sums`); dz = dy * (y > 0) with the
// fused ReLU (y the saved output), else dy.
//
// Per-column coefficients: the apply kernels read, per (outer, column),
// (mean, scale, shift) forward, y = (x - mean) * scale + shift, and
// (mean, alpha, beta, gamma) backward, dx = alpha * dz - beta * (x - mean) - gamma.
// `fwd_coef` computes them in double from the merged statistics; mean is
// rounded to the accumulation type A and the shift (gamma) takes up the
// rounding, so x - mean stays exact near the mean (data with mean 1e4 and
// std 1 keep float32 precision, as in the CPU kernels).
//
// Order: every sum and merge above runs in an order fixed by the shapes and
// the launch geometry (which the launchers derive from the shapes alone):
// results are bitwise identical run to run. No atomics.
//
// L2 reuse: the apply kernels walk their grid in reverse block order, so
// they start on the data the statistics kernel read last, which is still in
// L2 (up to ~50 MB on an H100), and they load with evict-first hints and
// store with evict-first hints, which leave L2 to the data still to be read.
//
// Limits: O <= 65535, S <= 65535 (grid.y/z); R * K and A * C * B < 2^62;
// the units of one channel A * B / NV < 2^31 (checked by the launchers).
#pragma once
#include "common.cuh"

namespace fastreg {

// NV (16-byte vector) or 1 (scalar) elements at p, as A.
template <bool VEC, bool LAST, typename T, typename A>
__device__ __forceinline__ void load_unit(const T* __restrict__ p, A* v) {
  if (VEC) {
    if (LAST) load_vec_last(p, v);
    else load_vec(p, v);
  } else {
    v[0] = to_acc(*p);
  }
}

template <bool VEC, typename T, typename A>
__device__ __forceinline__ void store_unit(T* __restrict__ p, const A* v) {
  if (VEC) store_vec_last(p, v);
  else *p = from_acc<T>(v[0]);
}

// dz = dy * (y > 0) for the fused ReLU (y non-null), else dy. NaN dy stays NaN.
template <bool VEC, typename T, typename A>
__device__ __forceinline__ void load_dz(const T* __restrict__ dy, const T* __restrict__ y,
                                        long long off, A* dz) {
  load_unit<VEC, true>(dy + off, dz);
  if (y != nullptr) {
    A yv[Vec<T>::N];
    load_unit<VEC, true>(y + off, yv);
#pragma unroll
    for (int i = 0; i < (VEC ? Vec<T>::N : 1); ++i) dz[i] *= yv[i] > A(0) ? A(1) : A(0);
  }
}

// Shifted sums (s1, s2, n) to a Welford triple (n, s1 / n, s2 - s1^2 / n) about the shift.
template <typename P>
__device__ __forceinline__ Welford<P> shifted_to_welford(P n, P s1, P s2) {
  Welford<P> w = {n, P(0), P(0)};
  if (n > P(0)) {
    w.mean = s1 / n;
    w.m2 = s2 - s1 * w.mean;
    if (w.m2 < P(0)) w.m2 = P(0);  // rounding; NaN passes
  }
  return w;
}

// ------------------------------------------------------------------ rows geometry
struct RowsTile {
  int o, s, TR, ty, j0, r0, r1;
  bool has;  // the thread owns columns (j0 < K)
};

// The block's tile; `reverse` walks the grid from its last block (apply kernels).
__device__ __forceinline__ RowsTile rows_tile(int R, int K, int rows_per_split, int TC, int NV,
                                              bool reverse) {
  RowsTile q;
  const int ct = reverse ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  q.s = reverse ? gridDim.y - 1 - blockIdx.y : blockIdx.y;
  q.o = reverse ? gridDim.z - 1 - blockIdx.z : blockIdx.z;
  q.TR = blockDim.x / TC;
  q.ty = threadIdx.x / TC;
  q.j0 = (ct * TC + threadIdx.x % TC) * NV;
  q.has = q.j0 < K;
  q.r0 = q.s * rows_per_split;
  q.r1 = q.r0 + rows_per_split < R ? q.r0 + rows_per_split : R;
  return q;
}

// Index of partial (plane, column j) of tile q in a (planes, O, S, K) buffer.
__device__ __forceinline__ long long part_index(int plane, const RowsTile& q, int K, int j) {
  return ((((long long)plane * gridDim.z + q.o) * gridDim.y + q.s) * K) + j;
}

// ------------------------------------------------------------------ rows: statistics
// part: (3, O, S, K) triples (n, mean - k, M2) in P. Dynamic shared memory:
// (2 * NV + 1) * blockDim.x values of P.
template <typename T, typename P, bool VEC>
__device__ __forceinline__ void rows_stats(const T* __restrict__ x, P* __restrict__ part, int R,
                                           int K, int W, int rows_per_split, int TC) {
  typedef typename Acc<T>::type A;
  enum { N = Vec<T>::N, NV = VEC ? Vec<T>::N : 1 };
  FASTREG_DYNAMIC_SHARED(P, sh);
  const RowsTile q = rows_tile(R, K, rows_per_split, TC, NV, false);
  const T* xo = x + (long long)q.o * R * K;
  P k[N], s1[N], s2[N];
#pragma unroll
  for (int i = 0; i < N; ++i) k[i] = s1[i] = s2[i] = P(0);
  P cnt = P(0);
  if (q.has) {
#pragma unroll
    for (int i = 0; i < NV; ++i) k[i] = P(to_acc(xo[(q.j0 + i) / W * W]));
#pragma unroll 4
    for (int r = q.r0 + q.ty; r < q.r1; r += q.TR) {
      A v[N];
      load_unit<VEC, false>(xo + (long long)r * K + q.j0, v);
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        const P d = P(v[i]) - k[i];
        s1[i] += d;
        s2[i] += d * d;
      }
      cnt += P(1);
    }
  }
  Welford<P> st[N];
#pragma unroll
  for (int i = 0; i < NV; ++i) st[i] = shifted_to_welford(cnt, s1[i], s2[i]);
  // Pairwise tree over ty: in the round of `stride`, row ty < stride merges row ty + stride.
  const int bd = blockDim.x, t = threadIdx.x;
  for (int stride = q.TR >> 1; stride >= 1; stride >>= 1) {
    if (q.ty >= stride && q.ty < 2 * stride) {
      sh[t] = st[0].n;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        sh[(1 + i) * bd + t] = st[i].mean;
        sh[(1 + NV + i) * bd + t] = st[i].m2;
      }
    }
    __syncthreads();
    if (q.ty < stride) {
      const int u = t + stride * TC;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        Welford<P> o = {sh[u], sh[(1 + i) * bd + u], sh[(1 + NV + i) * bd + u]};
        st[i] = welford_merge(st[i], o);
      }
    }
    // no second barrier: the next round writes rows [stride/2, stride), read by nobody here
  }
  if (q.ty == 0 && q.has) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      part[part_index(0, q, K, q.j0 + i)] = st[i].n;
      part[part_index(1, q, K, q.j0 + i)] = st[i].mean;
      part[part_index(2, q, K, q.j0 + i)] = st[i].m2;
    }
  }
}

// ------------------------------------------------------------------ rows: apply
// coef: (3, O, K) of A: mean, scale, shift per column. y = (x - mean) * scale + shift,
// then max(., 0) with relu (NaN passes).
template <typename T, bool VEC>
__device__ __forceinline__ void rows_apply(const T* __restrict__ x,
                                           const typename Acc<T>::type* __restrict__ coef,
                                           T* __restrict__ y, int R, int K, int rows_per_split,
                                           int TC, int relu) {
  typedef typename Acc<T>::type A;
  enum { N = Vec<T>::N, NV = VEC ? Vec<T>::N : 1 };
  const RowsTile q = rows_tile(R, K, rows_per_split, TC, NV, true);
  if (!q.has) return;  // no barriers in this kernel
  const long long c0 = (long long)q.o * K + q.j0, plane = (long long)gridDim.z * K;
  A mu[N], sc[N], sf[N];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    mu[i] = coef[c0 + i];
    sc[i] = coef[plane + c0 + i];
    sf[i] = coef[2 * plane + c0 + i];
  }
  const long long base = (long long)q.o * R * K + q.j0;
#pragma unroll 4
  for (int r = q.r0 + q.ty; r < q.r1; r += q.TR) {
    A v[N];
    load_unit<VEC, true>(x + base + (long long)r * K, v);
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      v[i] = (v[i] - mu[i]) * sc[i] + sf[i];
      if (relu && v[i] < A(0)) v[i] = A(0);
    }
    store_unit<VEC>(y + base + (long long)r * K, v);
  }
}

// ------------------------------------------------------------------ rows: backward sums
// part: (2, O, S, K) of P: sum(dz), sum(dz * (x - center)) per column; center[o * (K / W) + j / W].
// Dynamic shared memory: 2 * NV * blockDim.x values of P.
template <typename T, typename P, bool VEC>
__device__ __forceinline__ void rows_bwd_reduce(const T* __restrict__ dy, const T* __restrict__ x,
                                                const T* __restrict__ y,
                                                const P* __restrict__ center, P* __restrict__ part,
                                                int R, int K, int W, int rows_per_split, int TC) {
  typedef typename Acc<T>::type A;
  enum { N = Vec<T>::N, NV = VEC ? Vec<T>::N : 1 };
  FASTREG_DYNAMIC_SHARED(P, sh);
  const RowsTile q = rows_tile(R, K, rows_per_split, TC, NV, false);
  P mu[N], sg[N], sgx[N];
#pragma unroll
  for (int i = 0; i < N; ++i) mu[i] = sg[i] = sgx[i] = P(0);
  if (q.has) {
#pragma unroll
    for (int i = 0; i < NV; ++i) mu[i] = center[(long long)q.o * (K / W) + (q.j0 + i) / W];
    const long long base = (long long)q.o * R * K + q.j0;
#pragma unroll 4
    for (int r = q.r0 + q.ty; r < q.r1; r += q.TR) {
      A g[N], v[N];
      const long long off = base + (long long)r * K;
      load_dz<VEC>(dy, y, off, g);
      load_unit<VEC, false>(x + off, v);
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        sg[i] += P(g[i]);
        sgx[i] += P(g[i]) * (P(v[i]) - mu[i]);
      }
    }
  }
  const int bd = blockDim.x, t = threadIdx.x;
  for (int stride = q.TR >> 1; stride >= 1; stride >>= 1) {
    if (q.ty >= stride && q.ty < 2 * stride) {
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        sh[i * bd + t] = sg[i];
        sh[(NV + i) * bd + t] = sgx[i];
      }
    }
    __syncthreads();
    if (q.ty < stride) {
      const int u = t + stride * TC;
#pragma unroll
      for (int i = 0; i < NV; ++i) {
        sg[i] += sh[i * bd + u];
        sgx[i] += sh[(NV + i) * bd + u];
      }
    }
  }
  if (q.ty == 0 && q.has) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      part[part_index(0, q, K, q.j0 + i)] = sg[i];
      part[part_index(1, q, K, q.j0 + i)] = sgx[i];
    }
  }
}

// ------------------------------------------------------------------ rows: dx
// coef: (4, O, K) of A: mean, alpha, beta, gamma per column.
template <typename T, bool VEC>
__device__ __forceinline__ void rows_bwd_apply(const T* __restrict__ dy, const T* __restrict__ x,
                                               const T* __restrict__ y,
                                               const typename Acc<T>::type* __restrict__ coef,
                                               T* __restrict__ dx, int R, int K,
                                               int rows_per_split, int TC) {
  typedef typename Acc<T>::type A;
  enum { N = Vec<T>::N, NV = VEC ? Vec<T>::N : 1 };
  const RowsTile q = rows_tile(R, K, rows_per_split, TC, NV, true);
  if (!q.has) return;
  const long long c0 = (long long)q.o * K + q.j0, plane = (long long)gridDim.z * K;
  A mu[N], al[N], be[N], ga[N];
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    mu[i] = coef[c0 + i];
    al[i] = coef[plane + c0 + i];
    be[i] = coef[2 * plane + c0 + i];
    ga[i] = coef[3 * plane + c0 + i];
  }
  const long long base = (long long)q.o * R * K + q.j0;
#pragma unroll 4
  for (int r = q.r0 + q.ty; r < q.r1; r += q.TR) {
    A g[N], v[N];
    const long long off = base + (long long)r * K;
    load_dz<VEC>(dy, y, off, g);
    load_unit<VEC, true>(x + off, v);
#pragma unroll
    for (int i = 0; i < NV; ++i) v[i] = al[i] * g[i] - be[i] * (v[i] - mu[i]) - ga[i];
    store_unit<VEC>(dx + off, v);
  }
}

// ------------------------------------------------------------------ merges
// Warp gw = (o, g) of O * G statistic groups (G = K / W): merges the S * W
// triples of the group, lane l taking items l, l + 32, ... in order (item p =
// split p / W, column g * W + p % W), then a warp butterfly. In double. The
// shift k = x[o * shift_outer + g * shift_group] is added back to the mean.
// count, mean, m2: O * G doubles. Whole warps beyond O * G return at once.
template <typename T, typename P>
__device__ __forceinline__ void merge_stats(const T* __restrict__ x, const P* __restrict__ part,
                                            int O, int S, int K, int W, long long shift_outer,
                                            int shift_group, double* __restrict__ count,
                                            double* __restrict__ mean, double* __restrict__ m2) {
  const int G = K / W;
  const long long gw = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (gw >= (long long)O * G) return;
  const int lane = threadIdx.x & 31, o = int(gw / G), g = int(gw % G);
  const long long plane = (long long)O * S * K;
  Welford<double> st = {0.0, 0.0, 0.0};
  for (int p = lane; p < S * W; p += 32) {
    const long long i = ((long long)o * S + p / W) * K + (long long)g * W + p % W;
    const Welford<double> b = {double(part[i]), double(part[plane + i]),
                               double(part[2 * plane + i])};
    st = welford_merge(st, b);
  }
  st = warp_welford(st);
  if (lane == 0) {
    const double k = st.n > 0.0 ? double(to_acc(x[o * shift_outer + (long long)g * shift_group]))
                                : 0.0;
    count[gw] = st.n;
    mean[gw] = k + st.mean;
    m2[gw] = st.m2;
  }
}

// Backward sums of each (o, g) group over its S * W partials, in the order of
// merge_stats; out1 is multiplied by scale[gw] (rstd) when scale is given.
template <typename P>
__device__ __forceinline__ void merge_sums(const P* __restrict__ part, int O, int S, int K, int W,
                                           const double* __restrict__ scale,
                                           double* __restrict__ out0, double* __restrict__ out1) {
  const int G = K / W;
  const long long gw = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (gw >= (long long)O * G) return;
  const int lane = threadIdx.x & 31, o = int(gw / G), g = int(gw % G);
  const long long plane = (long long)O * S * K;
  double s0 = 0.0, s1 = 0.0;
  for (int p = lane; p < S * W; p += 32) {
    const long long i = ((long long)o * S + p / W) * K + (long long)g * W + p % W;
    s0 += double(part[i]);
    s1 += double(part[plane + i]);
  }
  s0 = warp_sum(s0);
  s1 = warp_sum(s1);
  if (lane == 0) {
    out0[gw] = s0;
    out1[gw] = scale != nullptr ? s1 * scale[gw] : s1;
  }
}

// ------------------------------------------------------------------ forward coefficients
// One thread per (o, column j) of O x (G * W) columns, group g = j / W. Training:
// var = m2 / n (biased; 0 for n = 0), rstd = 1 / sqrt(var + eps); inference:
// `stat` holds the given rstd. In double:
//   coef = (A(mean), A(rstd * w), A(b - (mean - A(mean)) * rstd * w))
// with w, b the weight and bias of the group (per_column = 0) or of the column.
// The first column of a group writes mean_out, rstd_out (A) and var_out (double)
// where they are given.
template <typename T>
__device__ __forceinline__ void fwd_coef(const double* __restrict__ count,
                                         const double* __restrict__ mean,
                                         const double* __restrict__ stat, int training,
                                         const T* __restrict__ w, const T* __restrict__ b,
                                         double eps, int O, int G, int W, int per_column,
                                         typename Acc<T>::type* __restrict__ mean_out,
                                         typename Acc<T>::type* __restrict__ rstd_out,
                                         double* __restrict__ var_out,
                                         typename Acc<T>::type* __restrict__ coef) {
  typedef typename Acc<T>::type A;
  const long long K = (long long)G * W, total = (long long)O * K;
  const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int j = int(idx % K), g = j / W;
  const long long st = idx / K * G + g;
  const double mu = mean[st];
  double r, var = 0.0;
  if (training) {
    const double n = count[st];
    var = n > 0.0 ? stat[st] / n : 0.0;
    r = 1.0 / sqrt(var + eps);
  } else {
    r = stat[st];
  }
  const int p = per_column ? j : g;
  const double wv = w != nullptr ? double(to_acc(w[p])) : 1.0;
  const double bv = b != nullptr ? double(to_acc(b[p])) : 0.0;
  const A mu_a = A(mu);
  const double scale = r * wv;
  coef[idx] = mu_a;
  coef[total + idx] = A(scale);
  coef[2 * total + idx] = A(bv - (mu - double(mu_a)) * scale);
  if (j % W == 0) {
    if (mean_out != nullptr) mean_out[st] = A(mu);
    if (rstd_out != nullptr) rstd_out[st] = A(r);
    if (var_out != nullptr) var_out[st] = var;
  }
}

}  // namespace fastreg

// Instances take `vec` (0/1) and pick the 16-byte or the scalar body once, at the top.
#define FASTREG_CN_UNPAREN(...) __VA_ARGS__
#define FASTREG_CN_BY_VEC(f, targs, args)                            \
  if (vec) fastreg::f<FASTREG_CN_UNPAREN targs, true> args;          \
  else fastreg::f<FASTREG_CN_UNPAREN targs, false> args
