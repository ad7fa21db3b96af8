// Layer norm and RMS norm over rows, forward and backward.
//
//   layer norm  y = (x - mean) * rstd * w + b,  rstd = 1 / sqrt(var + eps)  (biased var)
//   RMS norm    y = x * rstd * w,               rstd = 1 / sqrt(mean(x^2) + eps)
//   backward    xhat = (x - mean) * rstd (RMS: x * rstd), g = dy * w
//               dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (RMS: no mean(g) term)
//               dw = sum over rows of dy * xhat, db = sum over rows of dy
//
// x is viewed as M rows of D contiguous elements. T is the storage type
// (__half, __nv_bfloat16, float, double); A = Acc<T> (float, or double for
// double) holds every intermediate; the statistics are stored as A.
//
// Parallel strategy (launch geometry chosen in fastreg/cuda/norm.py):
// - register path: a row group of R threads (a power of two, 32..1024) owns a
//   row; thread t of the group holds K slots of Vec<T>::N elements in
//   registers, so D <= R * K * N. Slot (k, i) is column (k*R + t)*N + i when
//   the rows are 16-byte aligned (vec = 1: 16-byte loads and stores), else
//   (k*N + i)*R + t (scalar loads, still coalesced). The row is read from
//   memory once: the mean is reduced first, then the centred sums of x - mean
//   and its square from the registers (corrected two-pass: the first sum
//   recovers the rounding of the mean, so y keeps A's accuracy at any offset;
//   x^2 is formed in A, never in half).
// - loop path (D beyond the registers): one row per block, the row walked in
//   tiles of blockDim * N; per thread a Chan/Welford state of x - x[row, 0]
//   (shifted: the mean's rounding stays small beside the spread) merged tile
//   by tile, then a second walk writes y (x read twice; the second read hits
//   L2 while the rows in flight fit in it: ~0.5k rows of 512 threads on an
//   H100, so up to D ~ 16k fp32).
// - backward, register path: a grid of G blocks (G fixed by the shapes) walks
//   the row groups; each thread accumulates dw/db for its columns in
//   registers over all the rows it visits; the block's row groups are added
//   in group order through shared memory into one partial row per block; a
//   second kernel adds the G partial rows in block order (flash-attn's
//   scheme). Backward, loop path: one kernel writes dx (two walks over the
//   row), another forms the partial rows column-parallel over fixed row
//   ranges. No atomics: every result is bitwise identical run to run.
//
// Reduction order: within a thread, slots in increasing (k, i); across the
// group, warp butterflies then warps in increasing order (common.cuh).
//
// Bytes (minimal): forward reads x (+ w, b) and writes y (+ mean, rstd);
// backward reads dy, x (+ w, mean, rstd) and writes dx (+ dw, db); the
// backward partial rows add 2 * G * D * sizeof(A) per parameter gradient.
//
// Limits: M < 2^31 rows, D < 2^31 columns; any D >= 0 (the loop path has no
// upper bound). Rows beyond M in the last block are computed as inactive
// (they still take part in the block's barriers).
#include "common.cuh"

namespace fastreg {

// ------------------------------------------------------------------ row slots
// Thread t of a group of R threads owns K slots of N = Vec<T>::N elements.
// VEC (rows 16-byte aligned, D % N == 0): slot (k, i) is column (k*R + t)*N + i,
// loaded and stored 16 bytes at a time. Scalar: column (k*N + i)*R + t.
template <bool VEC>
__device__ __forceinline__ int slot_col(int k, int i, int R, int t, int N) {
  return VEC ? (k * R + t) * N + i : (k * N + i) * R + t;
}
// Whether slot (k, i) holds a column < D (with vectors: one test per k).
template <bool VEC>
__device__ __forceinline__ bool slot_in(int k, int i, int R, int t, int N, int D) {
  return VEC ? (k * R + t) * N < D : (k * N + i) * R + t < D;
}

// Load a row's slots into registers (0 beyond the row and for inactive groups).
template <bool VEC, typename T, int K, typename A>
__device__ __forceinline__ void load_row(const T* __restrict__ row, int D, int R, int t,
                                         bool active, A (&v)[K][Vec<T>::N]) {
  const int N = Vec<T>::N;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (VEC) {
      if (active && slot_in<VEC>(k, 0, R, t, N, D)) {
        load_vec(row + slot_col<VEC>(k, 0, R, t, N), v[k]);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) v[k][i] = A(0);
      }
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i)
        v[k][i] = (active && slot_in<VEC>(k, i, R, t, N, D)) ? to_acc(row[slot_col<VEC>(k, i, R, t, N)])
                                                             : A(0);
    }
  }
}

// Store slot k of a row (nothing for inactive groups or beyond the row).
template <bool VEC, typename T, typename A>
__device__ __forceinline__ void store_slot(T* __restrict__ row, int k, int D, int R, int t,
                                           bool active, const A* v) {
  if (!active) return;
  const int N = Vec<T>::N;
  if (VEC) {
    if (slot_in<VEC>(k, 0, R, t, N, D)) store_vec(row + slot_col<VEC>(k, 0, R, t, N), v);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (slot_in<VEC>(k, i, R, t, N, D)) row[slot_col<VEC>(k, i, R, t, N)] = from_acc<T>(v[i]);
  }
}

template <bool VEC, typename T, int K, typename A>
__device__ __forceinline__ void store_row(T* __restrict__ row, int D, int R, int t, bool active,
                                          const A (&v)[K][Vec<T>::N]) {
#pragma unroll
  for (int k = 0; k < K; ++k) store_slot<VEC>(row, k, D, R, t, active, v[k]);
}

// Slot k of a parameter vector (weight or bias); `fill` where p is null or beyond D.
template <bool VEC, typename T, typename A>
__device__ __forceinline__ void load_param(const T* __restrict__ p, int k, int D, int R, int t,
                                           A fill, A* v) {
  const int N = Vec<T>::N;
  if (VEC && p != nullptr && slot_in<VEC>(k, 0, R, t, N, D)) {
    load_vec(p + slot_col<VEC>(k, 0, R, t, N), v);
    return;
  }
#pragma unroll
  for (int i = 0; i < N; ++i)
    v[i] = (p != nullptr && slot_in<VEC>(k, i, R, t, N, D)) ? to_acc(p[slot_col<VEC>(k, i, R, t, N)])
                                                             : fill;
}

// ------------------------------------------------------------------ forward, register path
// Grid: ceil(M / (blockDim.x / R)) blocks; group g of block b owns row b * (blockDim.x / R) + g.
// Reductions: LN sum x, then sum (x - mean)^2 over the registers; RMS sum x^2.
// Bytes: read x, w, b; write y, mean, rstd.
template <typename T, int K, bool RMS, bool VEC>
__device__ __forceinline__ void row_norm_fwd(const T* __restrict__ x, const T* __restrict__ w,
                                             const T* __restrict__ b, T* __restrict__ y,
                                             typename Acc<T>::type* __restrict__ mean,
                                             typename Acc<T>::type* __restrict__ rstd, int M,
                                             int D, typename Acc<T>::type eps, int R) {
  typedef typename Acc<T>::type A;
  const int N = Vec<T>::N;
  __shared__ A scratch[3 * 32];
  const int t = threadIdx.x & (R - 1);
  const long long row = (long long)blockIdx.x * (blockDim.x / R) + threadIdx.x / R;
  const bool active = row < M;
  const long long base = active ? row * D : 0;
  const A n = A(D > 0 ? D : 1);

  A v[K][N];
  load_row<VEC>(x + base, D, R, t, active, v);

  // LN: mu is the mean rounded to A, off by up to half an ulp of the mean: at a
  // mean of 1e6 and std 1 in float32 that is 0.03 in y. The centred sums
  // q = {sum (x - mu), sum (x - mu)^2} recover it (corrected two-pass):
  // dm = q0 / n, var = q1 / n - dm^2, y = ((x - mu) - dm) * r.
  A mu = A(0), dm = A(0), var;
  A q[2] = {A(0), A(0)};
  if (!RMS) {
    A s[1] = {A(0)};
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int i = 0; i < N; ++i) s[0] += v[k][i];
    group_sum(s, R, scratch);
    mu = s[0] / n;
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int i = 0; i < N; ++i)
        if (slot_in<VEC>(k, i, R, t, N, D)) {
          const A c = v[k][i] - mu;
          q[0] += c;
          q[1] += c * c;
        }
    group_sum(q, R, scratch + 32);
    dm = q[0] / n;
    var = q[1] / n - dm * dm;
    var = var < A(0) ? A(0) : var;  // NaN stays NaN
  } else {
    A s[1] = {A(0)};
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int i = 0; i < N; ++i) s[0] += v[k][i] * v[k][i];
    group_sum(s, R, scratch);
    var = s[0] / n;
  }
  const A r = rsqrt_acc(var + eps);

#pragma unroll
  for (int k = 0; k < K; ++k) {
    A wv[N];
    load_param<VEC>(w, k, D, R, t, A(1), wv);
    if (RMS) {
#pragma unroll
      for (int i = 0; i < N; ++i) v[k][i] = v[k][i] * r * wv[i];
    } else {
      A bv[N];
      load_param<VEC>(b, k, D, R, t, A(0), bv);
#pragma unroll
      for (int i = 0; i < N; ++i) v[k][i] = ((v[k][i] - mu) - dm) * r * wv[i] + bv[i];
    }
    store_slot<VEC>(y + base, k, D, R, t, active, v[k]);
  }
  if (active && t == 0) {
    if (!RMS) mean[row] = mu + dm;
    rstd[row] = r;
  }
}

// ------------------------------------------------------------------ forward, loop path
// Grid: M blocks, one row each; the block walks the row in tiles of blockDim.x * N:
// first a Chan/Welford state per thread (each tile's values merged as one exact
// (count, mean, m2)), merged across the block in a fixed order; then y.
// Bytes: x read twice, y written once.
template <typename T, bool RMS, bool VEC>
__device__ __forceinline__ void row_norm_fwd_loop(const T* __restrict__ x, const T* __restrict__ w,
                                                  const T* __restrict__ b, T* __restrict__ y,
                                                  typename Acc<T>::type* __restrict__ mean,
                                                  typename Acc<T>::type* __restrict__ rstd,
                                                  int D, typename Acc<T>::type eps) {
  typedef typename Acc<T>::type A;
  const int N = Vec<T>::N;
  __shared__ A scratch[3 * 32];
  const int R = blockDim.x, t = threadIdx.x;
  const long long row = blockIdx.x;
  const T* xr = x + row * D;
  T* yr = y + row * D;
  const A n = A(D > 0 ? D : 1);

  // LN: the statistics of x - shift, shift = the row's first element: a mean
  // reduced in A is off by up to half an ulp of itself (0.03 at a mean of 1e6 in
  // float32), which y = (x - mean) * r would carry; near the data, x - shift is
  // exact (Sterbenz) and the shifted mean is small, so y keeps float32 accuracy.
  const A shift = (!RMS && D > 0) ? to_acc(xr[0]) : A(0);
  Welford<A> st = {A(0), A(0), A(0)};
  A ss = A(0);
  for (int base = 0; base < D; base += R * N) {
    A v[1][N];
    load_row<VEC>(xr + base, D - base, R, t, true, v);
    if (RMS) {
#pragma unroll
      for (int i = 0; i < N; ++i) ss += v[0][i] * v[0][i];
    } else {
      Welford<A> c = {A(0), A(0), A(0)};
      A s = A(0);
#pragma unroll
      for (int i = 0; i < N; ++i)
        if (slot_in<VEC>(0, i, R, t, N, D - base)) {
          c.n += A(1);
          v[0][i] -= shift;
          s += v[0][i];
        }
      if (c.n > A(0)) {
        c.mean = s / c.n;
#pragma unroll
        for (int i = 0; i < N; ++i)
          if (slot_in<VEC>(0, i, R, t, N, D - base)) c.m2 += (v[0][i] - c.mean) * (v[0][i] - c.mean);
        st = welford_merge(st, c);
      }
    }
  }
  A mu = A(0), var;
  if (RMS) {
    A s[1] = {ss};
    group_sum(s, R, scratch);
    var = s[0] / n;
  } else {
    st = block_welford(st, scratch);
    mu = st.mean;
    var = st.m2 / n;
  }
  const A r = rsqrt_acc(var + eps);

  for (int base = 0; base < D; base += R * N) {
    A v[1][N], wv[N], bv[N];
    load_row<VEC>(xr + base, D - base, R, t, true, v);
    load_param<VEC>(w == nullptr ? w : w + base, 0, D - base, R, t, A(1), wv);
    load_param<VEC>(b == nullptr ? b : b + base, 0, D - base, R, t, A(0), bv);
#pragma unroll
    for (int i = 0; i < N; ++i)
      v[0][i] = RMS ? v[0][i] * r * wv[i] : ((v[0][i] - shift) - mu) * r * wv[i] + bv[i];
    store_row<VEC>(yr + base, D - base, R, t, true, v);
  }
  if (t == 0) {
    if (!RMS) mean[row] = shift + mu;
    rstd[row] = r;
  }
}

// ------------------------------------------------------------------ backward, register path
// One partial row per block (row blockIdx.x of part): the block's row groups'
// accumulators added in group order, through dynamic shared memory when there
// are several groups. part == nullptr (gradient not wanted) is uniform.
template <bool VEC, int K, int N, typename A>
__device__ __forceinline__ void block_partial_row(A* __restrict__ part, const A (&acc)[K][N], int D,
                                                  int R, int groups, int g, int t) {
  if (part == nullptr) return;
  part += (long long)blockIdx.x * D;
  if (groups == 1) {
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int i = 0; i < N; ++i)
        if (slot_in<VEC>(k, i, R, t, N, D)) part[slot_col<VEC>(k, i, R, t, N)] = acc[k][i];
    return;
  }
  FASTREG_DYNAMIC_SHARED(A, rows);
  __syncthreads();  // earlier readers of `rows` (the previous gradient) are done
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (slot_in<VEC>(k, i, R, t, N, D)) rows[g * D + slot_col<VEC>(k, i, R, t, N)] = acc[k][i];
  __syncthreads();
  for (int c = threadIdx.x; c < D; c += blockDim.x) {
    A sum = rows[c];
    for (int j = 1; j < groups; ++j) sum += rows[j * D + c];
    part[c] = sum;
  }
}

// Grid: G blocks walking row groups b, b + G, ... (G fixed by the shapes); each
// thread accumulates dw/db for its columns in registers over the rows it visits.
// dw_part/db_part: G rows of D, null when that gradient is not wanted. Dynamic
// shared memory: (blockDim.x / R) * D * sizeof(A) when a block holds several groups.
// Bytes: read dy, x, w, mean, rstd; write dx and the partial rows.
template <typename T, int K, bool RMS, bool VEC>
__device__ __forceinline__ void row_norm_bwd(const T* __restrict__ dy, const T* __restrict__ x,
                                             const typename Acc<T>::type* __restrict__ mean,
                                             const typename Acc<T>::type* __restrict__ rstd,
                                             const T* __restrict__ w, T* __restrict__ dx,
                                             typename Acc<T>::type* __restrict__ dw_part,
                                             typename Acc<T>::type* __restrict__ db_part, int M,
                                             int D, int R) {
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
    A xv[K][N], gv[K][N];
    load_row<VEC>(x + base, D, R, t, active, xv);
    load_row<VEC>(dy + base, D, R, t, active, gv);
    const A mu = (RMS || !active) ? A(0) : mean[row];
    const A r = active ? rstd[row] : A(0);
    A s[2] = {A(0), A(0)};  // sum g, sum g * xhat, with g = dy * w
#pragma unroll
    for (int k = 0; k < K; ++k) {
      A wv[N];
      load_param<VEC>(w, k, D, R, t, A(1), wv);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        // slots beyond the row hold dy = 0, so they add 0 everywhere below
        const A xh = (xv[k][i] - mu) * r;
        const A d = gv[k][i];
        adw[k][i] += d * xh;
        if (!RMS) adb[k][i] += d;
        const A gw = d * wv[i];
        s[0] += gw;
        s[1] += gw * xh;
        xv[k][i] = xh;
        gv[k][i] = gw;
      }
    }
    group_sum(s, R, scratch[parity]);
    const A a = RMS ? A(0) : s[0] / n, c = s[1] / n;
#pragma unroll
    for (int k = 0; k < K; ++k)
#pragma unroll
      for (int i = 0; i < N; ++i) xv[k][i] = r * (gv[k][i] - a - xv[k][i] * c);
    store_row<VEC>(dx + base, D, R, t, active, xv);
  }
  block_partial_row<VEC>(dw_part, adw, D, R, groups, g, t);
  if (!RMS) block_partial_row<VEC>(db_part, adb, D, R, groups, g, t);
}

// ------------------------------------------------------------------ backward, loop path
// dx only. Grid: M blocks, one row each; two walks over the row (the sums, then dx).
template <typename T, bool RMS, bool VEC>
__device__ __forceinline__ void row_norm_bwd_loop(const T* __restrict__ dy, const T* __restrict__ x,
                                                  const typename Acc<T>::type* __restrict__ mean,
                                                  const typename Acc<T>::type* __restrict__ rstd,
                                                  const T* __restrict__ w, T* __restrict__ dx, int D) {
  typedef typename Acc<T>::type A;
  const int N = Vec<T>::N;
  __shared__ A scratch[2 * 32];
  const int R = blockDim.x, t = threadIdx.x;
  const long long row = blockIdx.x;
  const T* xr = x + row * D;
  const T* dyr = dy + row * D;
  T* dxr = dx + row * D;
  const A n = A(D > 0 ? D : 1);
  const A mu = RMS ? A(0) : mean[row];
  const A r = rstd[row];

  A s[2] = {A(0), A(0)};
  for (int base = 0; base < D; base += R * N) {
    A xv[1][N], gv[1][N], wv[N];
    load_row<VEC>(xr + base, D - base, R, t, true, xv);
    load_row<VEC>(dyr + base, D - base, R, t, true, gv);
    load_param<VEC>(w == nullptr ? w : w + base, 0, D - base, R, t, A(1), wv);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const A gw = gv[0][i] * wv[i];  // 0 beyond the row
      s[0] += gw;
      s[1] += gw * ((xv[0][i] - mu) * r);
    }
  }
  group_sum(s, R, scratch);
  const A a = RMS ? A(0) : s[0] / n, c = s[1] / n;
  for (int base = 0; base < D; base += R * N) {
    A xv[1][N], gv[1][N], wv[N];
    load_row<VEC>(xr + base, D - base, R, t, true, xv);
    load_row<VEC>(dyr + base, D - base, R, t, true, gv);
    load_param<VEC>(w == nullptr ? w : w + base, 0, D - base, R, t, A(1), wv);
#pragma unroll
    for (int i = 0; i < N; ++i) xv[0][i] = r * (gv[0][i] * wv[i] - a - (xv[0][i] - mu) * r * c);
    store_row<VEC>(dxr + base, D - base, R, t, true, xv);
  }
}

// Partial rows of dw/db for the loop path, column-parallel: block (bx, by) covers
// columns [bx * blockDim.x, ...) and rows [by * rows_per_part, ...), in row order.
template <typename T, bool RMS>
__device__ __forceinline__ void row_norm_bwd_params(const T* __restrict__ dy, const T* __restrict__ x,
                                                    const typename Acc<T>::type* __restrict__ mean,
                                                    const typename Acc<T>::type* __restrict__ rstd,
                                                    typename Acc<T>::type* __restrict__ dw_part,
                                                    typename Acc<T>::type* __restrict__ db_part,
                                                    int M, int D, int rows_per_part) {
  typedef typename Acc<T>::type A;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= D) return;
  const long long first = (long long)blockIdx.y * rows_per_part;
  const long long last = first + rows_per_part < M ? first + rows_per_part : M;
  A sw = A(0), sb = A(0);
  for (long long row = first; row < last; ++row) {
    const A d = to_acc(dy[row * D + c]);
    const A xh = (to_acc(x[row * D + c]) - (RMS ? A(0) : mean[row])) * rstd[row];
    sw += d * xh;
    sb += d;
  }
  const long long o = (long long)blockIdx.y * D + c;
  if (dw_part != nullptr) dw_part[o] = sw;
  if (!RMS && db_part != nullptr) db_part[o] = sb;
}

}  // namespace fastreg

// ------------------------------------------------------------------ instances
// Every kernel takes the same parameters per direction; `vec` (0/1) picks the
// 16-byte or the scalar body once, at the top (two separately allocated paths).
// The params kernels read R as rows per partial row.
#define FASTREG_FWD_PARAMS(T, A)                                                        \
  (const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,           \
   T* __restrict__ y, A* __restrict__ mean, A* __restrict__ rstd, int M, int D, A eps,  \
   int R, int vec)
#define FASTREG_BWD_PARAMS(T, A)                                                        \
  (const T* __restrict__ dy, const T* __restrict__ x, const A* __restrict__ mean,       \
   const A* __restrict__ rstd, const T* __restrict__ w, T* __restrict__ dx,             \
   A* __restrict__ dw_part, A* __restrict__ db_part, int M, int D, int R, int vec)
#define FASTREG_BY_VEC(f, targs, args) \
  if (vec) fastreg::f<FASTREG_UNPAREN targs, true> args; else fastreg::f<FASTREG_UNPAREN targs, false> args
#define FASTREG_UNPAREN(...) __VA_ARGS__

#define FASTREG_ROW_FWD(T, A, tag, K, max_threads)                                             \
  FASTREG_KERNEL(layer_norm_fwd_##tag##_k##K, max_threads, FASTREG_FWD_PARAMS(T, A),           \
                 FASTREG_BY_VEC(row_norm_fwd, (T, K, false), (x, w, b, y, mean, rstd, M, D, eps, R))) \
  FASTREG_KERNEL(rms_norm_fwd_##tag##_k##K, max_threads, FASTREG_FWD_PARAMS(T, A),             \
                 FASTREG_BY_VEC(row_norm_fwd, (T, K, true), (x, w, b, y, mean, rstd, M, D, eps, R)))
#define FASTREG_ROW_BWD(T, A, tag, K, max_threads)                                             \
  FASTREG_KERNEL(layer_norm_bwd_##tag##_k##K, max_threads, FASTREG_BWD_PARAMS(T, A),           \
                 FASTREG_BY_VEC(row_norm_bwd, (T, K, false), (dy, x, mean, rstd, w, dx, dw_part, \
                                                            db_part, M, D, R)))                \
  FASTREG_KERNEL(rms_norm_bwd_##tag##_k##K, max_threads, FASTREG_BWD_PARAMS(T, A),             \
                 FASTREG_BY_VEC(row_norm_bwd, (T, K, true), (dy, x, mean, rstd, w, dx, dw_part,  \
                                                           db_part, M, D, R)))
// The kernels of one dtype that do not depend on K.
#define FASTREG_NORM_INSTANCES(T, A, tag)                                                      \
  FASTREG_KERNEL(layer_norm_fwd_##tag##_loop, 512, FASTREG_FWD_PARAMS(T, A),                   \
                 FASTREG_BY_VEC(row_norm_fwd_loop, (T, false), (x, w, b, y, mean, rstd, D, eps))) \
  FASTREG_KERNEL(rms_norm_fwd_##tag##_loop, 512, FASTREG_FWD_PARAMS(T, A),                     \
                 FASTREG_BY_VEC(row_norm_fwd_loop, (T, true), (x, w, b, y, mean, rstd, D, eps)))  \
  FASTREG_KERNEL(layer_norm_bwd_##tag##_loop, 512, FASTREG_BWD_PARAMS(T, A),                   \
                 FASTREG_BY_VEC(row_norm_bwd_loop, (T, false), (dy, x, mean, rstd, w, dx, D)))   \
  FASTREG_KERNEL(rms_norm_bwd_##tag##_loop, 512, FASTREG_BWD_PARAMS(T, A),                     \
                 FASTREG_BY_VEC(row_norm_bwd_loop, (T, true), (dy, x, mean, rstd, w, dx, D)))    \
  FASTREG_KERNEL(layer_norm_bwd_params_##tag, 256, FASTREG_BWD_PARAMS(T, A),                   \
                 (fastreg::row_norm_bwd_params<T, false>(dy, x, mean, rstd, dw_part, db_part,  \
                                                         M, D, R)))                            \
  FASTREG_KERNEL(rms_norm_bwd_params_##tag, 256, FASTREG_BWD_PARAMS(T, A),                     \
                 (fastreg::row_norm_bwd_params<T, true>(dy, x, mean, rstd, dw_part, db_part,   \
                                                        M, D, R)))                             \
  FASTREG_KERNEL(norm_sum_partials_##tag, 256,                                                 \
                 (const A* __restrict__ part, int G, int D, T* __restrict__ out),              \
                 (fastreg::sum_partials<T, A>(part, G, D, out)))

// Register-path instances: (K, largest block). The block bound sets the register
// budget (65536 / threads): at most 16 values of x per thread forward and of each
// of x, dy, dw, db backward, without spills (checked by tests/test_cuda_compile.py).
// fastreg/cuda/norm.py's ROW_KERNELS table mirrors these lines.
FASTREG_NORM_INSTANCES(__half, float, f16)
FASTREG_ROW_FWD(__half, float, f16, 1, 1024)
FASTREG_ROW_FWD(__half, float, f16, 2, 512)
FASTREG_ROW_BWD(__half, float, f16, 1, 512)
FASTREG_ROW_BWD(__half, float, f16, 2, 512)

FASTREG_NORM_INSTANCES(__nv_bfloat16, float, bf16)
FASTREG_ROW_FWD(__nv_bfloat16, float, bf16, 1, 1024)
FASTREG_ROW_FWD(__nv_bfloat16, float, bf16, 2, 512)
FASTREG_ROW_BWD(__nv_bfloat16, float, bf16, 1, 512)
FASTREG_ROW_BWD(__nv_bfloat16, float, bf16, 2, 512)

FASTREG_NORM_INSTANCES(float, float, f32)
FASTREG_ROW_FWD(float, float, f32, 1, 1024)
FASTREG_ROW_FWD(float, float, f32, 2, 1024)
FASTREG_ROW_FWD(float, float, f32, 4, 1024)
FASTREG_ROW_BWD(float, float, f32, 1, 512)
FASTREG_ROW_BWD(float, float, f32, 2, 512)
FASTREG_ROW_BWD(float, float, f32, 4, 512)

FASTREG_NORM_INSTANCES(double, double, f64)
FASTREG_ROW_FWD(double, double, f64, 1, 1024)
FASTREG_ROW_FWD(double, double, f64, 2, 1024)
FASTREG_ROW_FWD(double, double, f64, 4, 1024)
FASTREG_ROW_BWD(double, double, f64, 1, 512)
FASTREG_ROW_BWD(double, double, f64, 2, 512)
FASTREG_ROW_BWD(double, double, f64, 4, 512)
