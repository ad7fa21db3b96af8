// The prox family: proximal operators, fused optimizer steps, label-smoothed
// cross-entropy and group statistics (group lasso, max-norm, standardize,
// min-max scaling). The formulas are fastreg/prox.py's ("Update rules").
//
//   prox        y = soft(x, t) [/ (1 + l2)],  soft(x, t) = x - clamp(x, -t, t)
//   sgd_step    d = sign*g (+ wd*w); b = d | b*mom + (1-damp)*d; d = d + mom*b | b;
//               w = soft(w*(1 - lr*dwd) + (-lr)*d, lr*l1)
//   adam_step   d = sign*g (+ wd*w); w = w*decay; m = m + (1-b1)*(d - m);
//               v = v*b2 + ((1-b2)*d)*d; u = max(vmax, v) | v;
//               w = soft(w + (-lr/bc1)*m / (sqrt(u)/sqrt(bc2) + eps), lr*l1)
//   cross-entropy, per row z (K classes), target t, smoothed q = off + on*onehot(t):
//               loss = max + log(sum exp(z - max)) - on*z_t - off*sum z
//               (a term of weight 0 adds 0: -inf logits, masked classes, stay finite)
//               dz = scale * (exp(z - max) / sum - q)
//   groups      x viewed as (P, Q, R), reduced over Q: per group (p, r) a shift,
//               a scale and an offset, then y = (x - shift) * scale + offset
//
// T is the storage type (__half, __nv_bfloat16, float, double); A = Acc<T>
// (float, or double for double) is the compute type.
//
// Rounding (elementwise ops, optimizer steps, the apply pass of the group
// ops): every operation of the update rules is one IEEE-rounded __f*_rn /
// __d*_rn intrinsic, which the compiler never contracts into a fused
// multiply-add, with the scalars rounded once to A on the host. float32 and
// float64 results are then the CPU's bit for bit (flush-to-zero aside:
// CuPy compiles with -ftz=true, so float32 denormals are flushed on the GPU).
// float16/bfloat16 compute in float32 and round once when stored; optimizer
// state keeps the parameter's dtype (as torch's state does), loaded to
// float32, updated, used and stored rounded, as torch's fused CUDA Adam does.
// The cross-entropy and the group statistics use ordinary arithmetic
// (contractions allowed): their sums run over trees the CPU does not share.
//
// Strategies, bytes (minimal: each input read once, each output written once)
// and the bound each kernel should reach on an H100 (HBM3, ~3.35 TB/s peak,
// a copy ceiling near 3 TB/s read + written). None of this has been timed
// on a GPU yet: bench/gpu_check.py measures it.
// - prox_elementwise: grid-stride over 16-byte vectors (a scalar loop where a
//   pointer is misaligned), 4 vectors per thread. Reads x (and array
//   thresholds), writes y: 8 bytes per float32 element in place, memory-bound.
// - sgd_step / adam_step (lists in one launch, multi-tensor-apply style): the
//   host uploads a table of int64 rows (5 stream addresses, size, first
//   chunk); block b owns chunk b (`chunk` elements of one tensor, 16384 from
//   fastreg/cuda/prox.py) and finds its tensor by binary search of the
//   first-chunk column. 16-byte vectors where the tensor's streams are
//   aligned. SGD with momentum reads w, g, buffer and writes w, buffer (20
//   bytes per float32 element: 1.34 GB for 2^26 parameters, ~0.45 ms at
//   3 TB/s; the issue's bar is 2700 GB/s); Adam reads w, g, m, v (+ vmax) and
//   writes w, m, v (+ vmax) (28 bytes per float32 element).
// - cross_entropy_rows_k<KS>: a row group of R threads (a power of two,
//   32..1024) owns a row and holds it in registers as KS 16-byte slots per
//   thread (K <= R * KS * 16 / sizeof(T): float32 rows of up to 32768
//   classes at R = 1024, KS = 8; 16-bit rows of 32768 at R = 512, KS = 8;
//   float64 rows of 8192 at R = 1024, KS = 4). Max, then the sums (exp, z,
//   z_t) in one reduction, then the gradient from the registers: the logits
//   are read once and the gradient written once, 2 * N * K * sizeof(T) bytes
//   (+ 8 N for the targets). float32/float64 slots keep exp(z - max) between
//   the passes; 16-bit slots recompute it. At (8192, 32000) float32 that is
//   2.1 GB, ~0.7 ms at 3 TB/s (the issue's bar, 2x Liger-Kernel: 2322 GB/s,
//   0.90 ms); bfloat16 1.05 GB (bar 1756 GB/s, 0.60 ms). One row per block at
//   that size: the block's load, reduction and store phases do not overlap,
//   the other SMs' do.
// - cross_entropy_loop: longer rows, one row per 1024-thread block: an online
//   (max, sum exp) pass, then the gradient pass, which reads the row again
//   (from L2 while the rows in flight fit in it): up to 3 N K sizeof(T) bytes.
// - cross_entropy_count / cross_entropy_loss: one block each, over the
//   targets (rows not ignored; "mean" with ignore_index) and the float64 row
//   losses ("mean"/"sum"): 8 N bytes each.
// - group_stats / group_coefficients / group_apply: 256-thread blocks tile x
//   as (rt, qt, pt) threads along (r, q, p); each block reduces its rows
//   q0..q1 of Q into float64 partials per group (sum x^2; shifted sums; min
//   and max), a thread per group combines the partials in block order into
//   the coefficients, and the apply pass rewrites x tile by tile. Reads x
//   twice and writes y (3 passes; the second read hits L2 only for small x);
//   partials 8 * P * R * Q / q_rows bytes per statistic. Loads are coalesced
//   (consecutive threads, consecutive r or q) but scalar.
//
// Reduction order (every result bitwise identical run to run): within a
// thread, its elements in increasing index; across a row group, warp
// butterflies then warps in increasing order (common.cuh); across the q
// threads of a group tile, a pairwise tree over their q index; across blocks,
// partials in block order. No atomics.
//
// Limits: element counts < 2^63; cross-entropy N < 2^31 rows and K < 2^31
// classes; group ops Q, R < 2^31 and fewer than 2^31 blocks.
#include "common.cuh"

namespace fastreg {

// ------------------------------------------------------------------ exact arithmetic
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

// soft(v, th) = v - clamp(v, -th, th): v -+ th outside [-th, th], exactly 0
// inside, NaN for NaN v (the CPU's _soft, comparison for comparison).
template <typename A>
__device__ __forceinline__ A soft(A v, A th) {
  A cl = v < th ? v : th;
  cl = cl > -th ? cl : -th;
  return sub_rn(v, cl);
}

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return (reinterpret_cast<unsigned long long>(p) & 15ull) == 0;
}

// ------------------------------------------------------------------ elementwise prox
// Threshold t and l2: arrays read per element (step 1) or once (step 0), or
// the scalar value where the pointer is null.
template <typename A>
__device__ __forceinline__ A prox_value(A x, A th, A l2, int shrink) {
  const A y = soft(x, th);
  return shrink ? div_rn(y, add_rn(A(1), l2)) : y;
}

// x and y may be the same array (in place): no __restrict__.
template <typename T, bool VEC>
__device__ __forceinline__ void prox_elementwise(const T* x, T* y, long long n, const T* t,
                                                 typename Acc<T>::type t_value, int t_step,
                                                 const T* l2, typename Acc<T>::type l2_value,
                                                 int l2_step, int shrink) {
  typedef typename Acc<T>::type A;
  const int N = Vec<T>::N;
  const bool t_each = t != nullptr && t_step, l_each = l2 != nullptr && l2_step;
  const A t0 = (t == nullptr || n == 0) ? t_value : to_acc(t[0]);
  const A l0 = (l2 == nullptr || n == 0) ? l2_value : to_acc(l2[0]);
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long done = 0;
  if (VEC) {  // every array 16-byte aligned: whole vectors, then a scalar tail
    const long long nv = n / N;
    for (long long j = first; j < nv; j += stride) {
      A v[N], tv[N], lv[N];
      load_vec(x + j * N, v);
      if (t_each) {
        load_vec(t + j * N, tv);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) tv[i] = t0;
      }
      if (l_each) {
        load_vec(l2 + j * N, lv);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) lv[i] = l0;
      }
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = prox_value(v[i], tv[i], lv[i], shrink);
      store_vec(y + j * N, v);
    }
    done = nv * N;
  }
  for (long long j = done + first; j < n; j += stride)
    y[j] = from_acc<T>(prox_value(to_acc(x[j]), t_each ? to_acc(t[j]) : t0,
                                  l_each ? to_acc(l2[j]) : l0, shrink));
}

// ------------------------------------------------------------------ tensor tables
// One int64 row per tensor: the addresses of up to five streams (w, g, then
// the state; 0 where unused), the tensor's size and its first chunk.
enum { kTableSize = 5, kTableFirst = 6, kTableCols = 7 };

struct TensorChunk {
  int row;
  long long offset, n;
};

// Block blockIdx.x runs chunk blockIdx.x: the last tensor whose first chunk is <= it.
__device__ __forceinline__ TensorChunk find_chunk(const long long* __restrict__ table, int tensors,
                                                  long long chunk) {
  const long long c = blockIdx.x;
  int lo = 0, hi = tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[(long long)mid * kTableCols + kTableFirst] <= c) lo = mid;
    else hi = mid - 1;
  }
  TensorChunk r;
  r.row = lo;
  r.offset = (c - table[(long long)lo * kTableCols + kTableFirst]) * chunk;
  const long long left = table[(long long)lo * kTableCols + kTableSize] - r.offset;
  r.n = left < chunk ? left : chunk;
  return r;
}

template <typename T>
__device__ __forceinline__ T* stream(const long long* __restrict__ table, const TensorChunk& c,
                                     int s) {
  const long long address = table[(long long)c.row * kTableCols + s];
  return address == 0 ? nullptr : reinterpret_cast<T*>(address) + c.offset;
}

// ------------------------------------------------------------------ SGD
enum { kSgdNoBuffer = 0, kSgdFirst = 1, kSgdMomentum = 2 };

template <typename A>
struct SgdScalars {
  A sign, wd, mom, damp1, decay, neglr, th;
};

// One element, in the order of the update rules (fastreg/cpu/prox.py's _sgd_chunk).
template <typename A>
__device__ __forceinline__ A sgd_value(A x, A g, A& b, const SgdScalars<A>& s, int mode,
                                       int coupled, int nesterov) {
  A d = mul_rn(g, s.sign);
  if (coupled) d = add_rn(d, mul_rn(s.wd, x));
  if (mode != kSgdNoBuffer) {
    const A bk = mode == kSgdFirst ? d : add_rn(mul_rn(b, s.mom), mul_rn(s.damp1, d));
    b = bk;
    d = nesterov ? add_rn(d, mul_rn(s.mom, bk)) : bk;
  }
  x = add_rn(mul_rn(x, s.decay), mul_rn(s.neglr, d));
  return soft(x, s.th);
}

// Streams: w, g, momentum buffer (unread on the first step, untouched without momentum).
template <typename T>
__device__ __forceinline__ void sgd_step(const long long* __restrict__ table, int tensors,
                                         long long chunk, SgdScalars<typename Acc<T>::type> s,
                                         int mode, int coupled, int nesterov) {
  typedef typename Acc<T>::type A;
  const int N = Vec<T>::N;
  const TensorChunk c = find_chunk(table, tensors, chunk);
  T* __restrict__ w = stream<T>(table, c, 0);
  const T* __restrict__ g = stream<T>(table, c, 1);
  T* __restrict__ b = mode == kSgdNoBuffer ? nullptr : stream<T>(table, c, 2);
  long long done = 0;
  if (aligned16(w) && aligned16(g) && (b == nullptr || aligned16(b))) {
    const long long nv = c.n / N;
    for (long long j = threadIdx.x; j < nv; j += blockDim.x) {
      A wv[N], gv[N], bv[N];
      load_vec(w + j * N, wv);
      load_vec(g + j * N, gv);
      if (mode == kSgdMomentum) {
        load_vec(b + j * N, bv);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) bv[i] = A(0);
      }
#pragma unroll
      for (int i = 0; i < N; ++i)
        wv[i] = sgd_value(wv[i], gv[i], bv[i], s, mode, coupled, nesterov);
      store_vec(w + j * N, wv);
      if (b != nullptr) store_vec(b + j * N, bv);
    }
    done = nv * N;
  }
  for (long long j = done + threadIdx.x; j < c.n; j += blockDim.x) {
    A bj = mode == kSgdMomentum ? to_acc(b[j]) : A(0);
    w[j] = from_acc<T>(sgd_value(to_acc(w[j]), to_acc(g[j]), bj, s, mode, coupled, nesterov));
    if (b != nullptr) b[j] = from_acc<T>(bj);
  }
}

// ------------------------------------------------------------------ Adam / AdamW
template <typename A>
struct AdamScalars {
  A sign, wd, decay, lw, lw1, beta2, omb2, bc2s, eps, negss, th;
};

// One element, in the order of the update rules (fastreg/cpu/prox.py's _adam_chunk);
// lerp_small: 1 - beta1 < 0.5, the branch torch's lerp takes.
template <typename A>
__device__ __forceinline__ A adam_value(A x, A g, A& m, A& v, A& vmax, const AdamScalars<A>& s,
                                        int amsgrad, int coupled, int lerp_small) {
  A d = mul_rn(g, s.sign);
  if (coupled) d = add_rn(d, mul_rn(s.wd, x));
  x = mul_rn(x, s.decay);
  const A diff = sub_rn(d, m);
  m = lerp_small ? add_rn(m, mul_rn(s.lw, diff)) : sub_rn(d, mul_rn(diff, s.lw1));
  v = add_rn(mul_rn(v, s.beta2), mul_rn(mul_rn(s.omb2, d), d));
  A u = v;
  if (amsgrad) {
    u = v > vmax ? v : vmax;
    vmax = u;
  }
  x = add_rn(x, div_rn(mul_rn(s.negss, m), add_rn(div_rn(sqrt_rn(u), s.bc2s), s.eps)));
  return soft(x, s.th);
}

// Streams: w, g, exp_avg, exp_avg_sq, max_exp_avg_sq (amsgrad only).
template <typename T>
__device__ __forceinline__ void adam_step(const long long* __restrict__ table, int tensors,
                                          long long chunk, AdamScalars<typename Acc<T>::type> s,
                                          int amsgrad, int coupled, int lerp_small) {
  typedef typename Acc<T>::type A;
  const int N = Vec<T>::N;
  const TensorChunk c = find_chunk(table, tensors, chunk);
  T* __restrict__ w = stream<T>(table, c, 0);
  const T* __restrict__ g = stream<T>(table, c, 1);
  T* __restrict__ m = stream<T>(table, c, 2);
  T* __restrict__ v = stream<T>(table, c, 3);
  T* __restrict__ vm = amsgrad ? stream<T>(table, c, 4) : nullptr;
  long long done = 0;
  if (aligned16(w) && aligned16(g) && aligned16(m) && aligned16(v) &&
      (vm == nullptr || aligned16(vm))) {
    const long long nv = c.n / N;
    for (long long j = threadIdx.x; j < nv; j += blockDim.x) {
      A wv[N], gv[N], mv[N], vv[N], xv[N];
      load_vec(w + j * N, wv);
      load_vec(g + j * N, gv);
      load_vec(m + j * N, mv);
      load_vec(v + j * N, vv);
      if (amsgrad) {
        load_vec(vm + j * N, xv);
      } else {
#pragma unroll
        for (int i = 0; i < N; ++i) xv[i] = A(0);
      }
#pragma unroll
      for (int i = 0; i < N; ++i)
        wv[i] = adam_value(wv[i], gv[i], mv[i], vv[i], xv[i], s, amsgrad, coupled, lerp_small);
      store_vec(w + j * N, wv);
      store_vec(m + j * N, mv);
      store_vec(v + j * N, vv);
      if (amsgrad) store_vec(vm + j * N, xv);
    }
    done = nv * N;
  }
  for (long long j = done + threadIdx.x; j < c.n; j += blockDim.x) {
    A mj = to_acc(m[j]), vj = to_acc(v[j]), xj = amsgrad ? to_acc(vm[j]) : A(0);
    w[j] = from_acc<T>(adam_value(to_acc(w[j]), to_acc(g[j]), mj, vj, xj, s, amsgrad, coupled,
                                  lerp_small));
    m[j] = from_acc<T>(mj);
    v[j] = from_acc<T>(vj);
    if (amsgrad) vm[j] = from_acc<T>(xj);
  }
}

// ------------------------------------------------------------------ cross-entropy
__device__ __forceinline__ float exp_acc(float v) { return expf(v); }
__device__ __forceinline__ double exp_acc(double v) { return exp(v); }

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() {
  return __uint_as_float(0xff800000u);
}
template <> __device__ __forceinline__ double neg_inf<double>() {
  return __hiloint2double(int(0xfff00000u), 0);
}

// The larger of a and b with NaN ignored, as the CPU's `v if v > m else m`;
// symmetric in a and b (up to the sign of a zero, which changes no result), so
// a butterfly leaves the same maximum in every lane.
template <typename A>
__device__ __forceinline__ A max_ignoring_nan(A a, A b) {
  return (b > a || a != a) ? b : a;
}

// Maximum over a row group of R threads (R a power of two, 32..blockDim.x):
// warp butterflies, then the group's warp maxima in warp order. scratch holds
// blockDim.x / 32 values; every thread of the block must call it.
template <typename A>
__device__ __forceinline__ A group_max(A v, int R, A* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = max_ignoring_nan(v, __shfl_xor_sync(kFullMask, v, offset));
  if (R > 32) {
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) scratch[warp] = v;
    __syncthreads();
    const int first = warp & ~((R >> 5) - 1);
    A m = scratch[first];
    for (int k = 1; k < (R >> 5); ++k) m = max_ignoring_nan(m, scratch[first + k]);
    v = m;
  }
  return v;
}

// Thread t of a row group of R threads holds KS slots of N = Vec<T>::N values;
// value i of slot k is the thread's position j = k*N + i, which holds column
// (k*R + t)*N + i with 16-byte vectors (VEC: K % N == 0) and j*R + t with
// scalar loads (still coalesced). A thread's positions below `limit` are in
// the row; `target_pos` is the position of the target column when the thread
// holds it, else -1. Per value the kernels then compare j, a compile-time
// constant, with two registers (32-bit: K < 2^31).
struct RowSlots {
  int limit, target_pos;
};

template <bool VEC>
__device__ __forceinline__ RowSlots row_slots(int K, int N, int R, int t, long long tgt) {
  RowSlots s;
  s.target_pos = -1;
  if (VEC) {
    const int nv = K / N;
    s.limit = nv > t ? (nv - t + R - 1) / R * N : 0;
    if (tgt >= 0 && int(tgt / N) % R == t)
      s.target_pos = int(tgt / ((long long)N * R)) * N + int(tgt % N);
  } else {
    s.limit = K > t ? (K - t + R - 1) / R : 0;
    if (tgt >= 0 && int(tgt % R) == t) s.target_pos = int(tgt / R);
  }
  return s;
}

// Slot k of a row (0 beyond the row and for inactive rows), as 16 raw bytes.
template <bool VEC, typename T>
__device__ __forceinline__ uint4 load_slot(const T* row, int k, int R, int t, int limit,
                                           bool active) {
  const int N = Vec<T>::N;
  uint4 r;
  if (VEC) {
    if (active && k * N < limit) {
      r = *reinterpret_cast<const uint4*>(row + (k * R + t) * N);
    } else {
      r.x = r.y = r.z = r.w = 0u;
    }
  } else {
    // the elements' bits, moved into the slot without conversion
    r.x = r.y = r.z = r.w = 0u;
    T* e = reinterpret_cast<T*>(&r);
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (active && k * N + i < limit) e[i] = row[(k * N + i) * R + t];
  }
  return r;
}

template <bool VEC, typename T, typename A>
__device__ __forceinline__ void store_slot(T* row, int k, int R, int t, int limit, const A* v) {
  const int N = Vec<T>::N;
  if (VEC) {
    if (k * N < limit) store_vec(row + (k * R + t) * N, v);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (k * N + i < limit) row[(k * N + i) * R + t] = from_acc<T>(v[i]);
  }
}

// An empty asm statement the compiler must assume rewrites the slot: values
// unpacked from it before a reduction are then not carried across it (for
// 16-bit rows that would double the registers, 8 floats per 16-byte slot).
__device__ __forceinline__ void opaque(uint4& r) {
#ifndef FASTREG_EMULATOR
  asm volatile("" : "+r"(r.x), "+r"(r.y), "+r"(r.z), "+r"(r.w));
#else
  (void)r;
#endif
}

// weight * value for the loss, 0 for weight 0 (not 0 * -inf = NaN where the
// logits mask classes with -inf, as PyTorch without smoothing).
template <typename A>
__device__ __forceinline__ double ce_term(double weight, A value) {
  return weight != 0.0 ? weight * double(value) : 0.0;
}

// The row's scale: 1 / (rows not ignored) from the device count when given
// ("mean" with ignore_index), else the host's value.
__device__ __forceinline__ double ce_scale(const long long* count, double scale) {
  if (count == nullptr) return scale;
  const long long c = *count;
  return c ? 1.0 / double(c) : 0.0;
}

// Register path. Grid: ceil(M / (blockDim.x / R)) blocks; group g of block b
// owns row b * (blockDim.x / R) + g. z and dz may be the same array (the
// gradient written over the logits): every read of a row precedes the
// reductions, every write follows them.
// Outputs: dz; the row's loss into row_loss (float64) and/or row_loss_t (T).
template <typename T, int KS, bool VEC>
__device__ __forceinline__ void ce_rows(const T* z, const long long* __restrict__ target, T* dz,
                                        double* __restrict__ row_loss, T* __restrict__ row_loss_t,
                                        const long long* __restrict__ count, double scale,
                                        double on, double off, long long ignore, int has_ignore,
                                        int M, int K, int R) {
  typedef typename Acc<T>::type A;
  const int N = Vec<T>::N;
  // float32/float64 slots hold exp(z - max) after the sums; 16-bit slots (8
  // values per 16 bytes) have no room for it and recompute it.
  const bool keep_exp = sizeof(T) >= 4;
  __shared__ A scratch_max[32];
  __shared__ A scratch_sum[3 * 32];
  const int t = threadIdx.x & (R - 1);
  const long long row = (long long)blockIdx.x * (blockDim.x / R) + threadIdx.x / R;
  const bool active = row < M;
  const long long tgt = active ? target[row] : -1;
  const bool keep = active && !(has_ignore && tgt == ignore);
  const T* zr = z + (keep ? row * K : 0);
  const RowSlots rs = row_slots<VEC>(K, N, R, t, keep ? tgt : -1);

  uint4 raw[KS];
#pragma unroll
  for (int k = 0; k < KS; ++k) raw[k] = load_slot<VEC>(zr, k, R, t, rs.limit, keep);

  A mx = neg_inf<A>();
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    A v[N];
    Vec<T>::unpack(raw[k], v);
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (k * N + i < rs.limit) mx = max_ignoring_nan(mx, v[i]);
  }
  mx = group_max(mx, R, scratch_max);
  if (!keep_exp) {
#pragma unroll
    for (int k = 0; k < KS; ++k) opaque(raw[k]);
  }

  A s[3] = {A(0), A(0), A(0)};  // sum exp(z - max), sum z, z[target]
#pragma unroll
  for (int k = 0; k < KS; ++k) {
    A v[N];
    Vec<T>::unpack(raw[k], v);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if (k * N + i < rs.limit) {
        const A e = exp_acc(v[i] - mx);
        s[0] += e;
        s[1] += v[i];
        if (k * N + i == rs.target_pos) s[2] += v[i];
        if (keep_exp) v[i] = e;
      }
    }
    if (keep_exp) raw[k] = Vec<T>::pack(v);
  }
  group_sum(s, R, scratch_sum);
  if (!keep_exp) {
#pragma unroll
    for (int k = 0; k < KS; ++k) opaque(raw[k]);
  }

  if (!active) return;
  T* dr = dz + row * K;
  double loss = 0.0;
  if (keep) {
    // dz = scale * p - scale * q with p = e / sum (kept e) or exp(z - lse) (16-bit)
    const A c = A(ce_scale(count, scale));
    const A qo = A(off) * c, qt = A(off + on) * c;
    const A pc = keep_exp ? c / s[0] : c;
    const A lse = keep_exp ? A(0) : mx + A(log(double(s[0])));
#pragma unroll
    for (int k = 0; k < KS; ++k) {
      A v[N];
      Vec<T>::unpack(raw[k], v);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const A p = keep_exp ? v[i] : exp_acc(v[i] - lse);
        v[i] = p * pc - (k * N + i == rs.target_pos ? qt : qo);
      }
      store_slot<VEC>(dr, k, R, t, rs.limit, v);
    }
    loss = double(mx) + log(double(s[0])) - ce_term(on, s[2]) - ce_term(off, s[1]);
  } else {
    const RowSlots all = row_slots<VEC>(K, N, R, t, -1);
#pragma unroll
    for (int k = 0; k < KS; ++k) {
      A v[N];
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = A(0);
      store_slot<VEC>(dr, k, R, t, all.limit, v);
    }
  }
  if (t == 0) {
    if (row_loss != nullptr) row_loss[row] = loss;
    if (row_loss_t != nullptr) row_loss_t[row] = from_acc<T>(A(loss));
  }
}

// Online (max, sum exp) state of a set of logits, and its merge: the sums
// rescaled to the larger maximum. Symmetric in its arguments bit for bit (the
// products are __fmul_rn, which no compiler fuses with the sum in one lane's
// order only), so butterflies agree in every lane; a state at -inf (no
// element, or only -inf logits) adds nothing to a finite one.
template <typename A>
struct SoftmaxState {
  A m, s, sz, zt;  // max, sum exp(z - m), sum z, z[target]
};

template <typename A>
__device__ __forceinline__ SoftmaxState<A> softmax_merge(SoftmaxState<A> a, SoftmaxState<A> b) {
  SoftmaxState<A> r;
  r.m = max_ignoring_nan(a.m, b.m);
  r.s = (a.m == r.m ? a.s : mul_rn(a.s, exp_acc(a.m - r.m))) +
        (b.m == r.m ? b.s : mul_rn(b.s, exp_acc(b.m - r.m)));
  r.sz = a.sz + b.sz;
  r.zt = a.zt + b.zt;
  return r;
}

// Loop path (rows beyond the registers). Grid: M blocks, one row each; the
// block walks the row in tiles of blockDim.x * N: per thread an online
// (max, sum exp) state over its elements in index order, merged across the
// block (warp butterflies, then warps in order); then a second walk writes
// dz. Bytes: logits read twice, dz written once.
template <typename T, bool VEC>
__device__ __forceinline__ void ce_row_loop(const T* z, const long long* __restrict__ target,
                                            T* dz, double* __restrict__ row_loss,
                                            T* __restrict__ row_loss_t,
                                            const long long* __restrict__ count, double scale,
                                            double on, double off, long long ignore,
                                            int has_ignore, int K) {
  typedef typename Acc<T>::type A;
  const int N = Vec<T>::N;
  __shared__ A scratch[4 * 32];
  const int R = blockDim.x, t = threadIdx.x;
  const long long row = blockIdx.x;
  const long long tgt = target[row];
  const bool keep = !(has_ignore && tgt == ignore);
  const T* zr = z + row * K;
  T* dr = dz + row * K;
  const int tile = R * N;

  SoftmaxState<A> st = {neg_inf<A>(), A(0), A(0), A(0)};
  if (keep) {
    for (int base = 0; base < K; base += tile) {
      const RowSlots rs = row_slots<VEC>(K - base, N, R, t, tgt - base);
      A v[N];
      Vec<T>::unpack(load_slot<VEC>(zr + base, 0, R, t, rs.limit, true), v);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        if (i < rs.limit) {
          const A x = v[i];
          if (x > st.m) {
            st.s = st.s * exp_acc(st.m - x) + A(1);
            st.m = x;
          } else {
            st.s += x == st.m ? A(1) : exp_acc(x - st.m);  // x == m == -inf: no NaN
          }
          st.sz += x;
          if (i == rs.target_pos) st.zt += x;
        }
      }
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    SoftmaxState<A> o;
    o.m = __shfl_xor_sync(kFullMask, st.m, offset);
    o.s = __shfl_xor_sync(kFullMask, st.s, offset);
    o.sz = __shfl_xor_sync(kFullMask, st.sz, offset);
    o.zt = __shfl_xor_sync(kFullMask, st.zt, offset);
    st = softmax_merge(st, o);
  }
  const int nwarps = R >> 5;
  if (nwarps > 1) {
    const int warp = t >> 5;
    if ((t & 31) == 0) {
      scratch[warp] = st.m;
      scratch[32 + warp] = st.s;
      scratch[64 + warp] = st.sz;
      scratch[96 + warp] = st.zt;
    }
    __syncthreads();
    st.m = scratch[0];
    st.s = scratch[32];
    st.sz = scratch[64];
    st.zt = scratch[96];
    for (int k = 1; k < nwarps; ++k) {
      const SoftmaxState<A> o = {scratch[k], scratch[32 + k], scratch[64 + k], scratch[96 + k]};
      st = softmax_merge(st, o);
    }
  }

  double loss = 0.0;
  if (keep) {
    const A c = A(ce_scale(count, scale)), o = A(off), ot = A(off + on), inv = A(1) / st.s;
    for (int base = 0; base < K; base += tile) {
      const RowSlots rs = row_slots<VEC>(K - base, N, R, t, tgt - base);
      A v[N];
      Vec<T>::unpack(load_slot<VEC>(zr + base, 0, R, t, rs.limit, true), v);
#pragma unroll
      for (int i = 0; i < N; ++i)
        v[i] = (exp_acc(v[i] - st.m) * inv - (i == rs.target_pos ? ot : o)) * c;
      store_slot<VEC>(dr + base, 0, R, t, rs.limit, v);
    }
    loss = double(st.m) + log(double(st.s)) - ce_term(on, st.zt) - ce_term(off, st.sz);
  } else {
    for (int base = 0; base < K; base += tile) {
      const RowSlots rs = row_slots<VEC>(K - base, N, R, t, -1);
      A v[N];
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = A(0);
      store_slot<VEC>(dr + base, 0, R, t, rs.limit, v);
    }
  }
  if (t == 0) {
    if (row_loss != nullptr) row_loss[row] = loss;
    if (row_loss_t != nullptr) row_loss_t[row] = from_acc<T>(A(loss));
  }
}

// Rows not ignored ("mean" with ignore_index), into count[0]. One block;
// integer sums are exact in any order.
__device__ __forceinline__ void ce_count(const long long* __restrict__ target, int M,
                                         long long ignore, long long* __restrict__ count) {
  __shared__ long long scratch[32];
  long long c[1] = {0};
  for (long long i = threadIdx.x; i < M; i += blockDim.x) c[0] += target[i] != ignore ? 1 : 0;
  group_sum(c, blockDim.x, scratch);
  if (threadIdx.x == 0) *count = c[0];
}

// The reduced loss: the float64 row losses summed (thread i adds rows i,
// i + blockDim.x, ... in order, then the block's tree), divided by the rows
// not ignored for "mean" (NaN when there are none, as PyTorch). One block.
template <typename T>
__device__ __forceinline__ void ce_loss(const double* __restrict__ row_loss, int M,
                                        const long long* __restrict__ count, int mean,
                                        T* __restrict__ out) {
  __shared__ double scratch[32];
  double s[1] = {0.0};
  for (long long i = threadIdx.x; i < M; i += blockDim.x) s[0] += row_loss[i];
  group_sum(s, blockDim.x, scratch);
  if (threadIdx.x == 0) {
    double r = s[0];
    if (mean) {
      const long long c = count == nullptr ? M : *count;
      r = c ? r / double(c) : __hiloint2double(int(0x7ff80000u), 0);
    }
    *out = from_acc<T>(typename Acc<T>::type(r));
  }
}

// ------------------------------------------------------------------ group statistics
enum { kStatSumSquares = 0, kStatMoments = 1, kStatMinMax = 2 };
enum {
  kGroupL1 = 0, kMaxNorm = 1, kStandardizeFit = 2, kStandardizeApply = 3, kMinMaxFit = 4,
  kMinMaxApply = 5
};

// The tile of block blockIdx.x: p-tile pb, Q-block qb, r-tile rb (r fastest).
// The block's threads (1-D) form an (rt, qt, pt) grid, r fastest: thread
// (tr, tq, tp) handles column r0 + tr of row p0 + tp, rows q0 + tq, q0 + tq + qt, ...
struct GroupTile {
  long long p;
  int q0, q1, qb, r, tq, lin;
  bool on;
};

__device__ __forceinline__ GroupTile group_tile(long long P, int Q, int R, int q_rows, int nqb,
                                                int nrb, int rt, int qt) {
  GroupTile g;
  const long long task = blockIdx.x;
  const int rb = int(task % nrb);
  g.qb = int((task / nrb) % nqb);
  const long long pb = task / ((long long)nrb * nqb);
  g.lin = threadIdx.x;
  g.tq = (g.lin / rt) % qt;
  g.r = rb * rt + g.lin % rt;
  g.p = pb * (blockDim.x / (rt * qt)) + g.lin / (rt * qt);
  g.q0 = g.qb * q_rows;
  g.q1 = Q - g.q0 < q_rows ? Q : g.q0 + q_rows;
  g.on = g.r < R && g.p < P;
  return g;
}

// NaN-propagating min and max (numpy's), for the min-max partials.
__device__ __forceinline__ double min_nan(double a, double v) { return (v < a || v != v) ? v : a; }
__device__ __forceinline__ double max_nan(double a, double v) { return (v > a || v != v) ? v : a; }

// Partials of each group over the block's rows q0..q1 into part1/part2[(p * nqb + qb) * R + r]:
// sum x^2 (kStatSumSquares); sum (x - x0) and sum (x - x0)^2 with x0 = x[p, 0, r]
// (kStatMoments, shifted sums that keep the digits of offset data); min and max.
// Accumulation in float64; the qt threads of a column combine in a pairwise tree
// (qt a power of two). Shared memory: two values per thread (blockDim.x <= 256).
template <typename T>
__device__ __forceinline__ void group_stats(const T* __restrict__ x, int kind, long long P, int Q,
                                            int R, int q_rows, int nqb, int nrb, int rt, int qt,
                                            double* __restrict__ part1,
                                            double* __restrict__ part2) {
  __shared__ double s1[256], s2[256];
  const GroupTile g = group_tile(P, Q, R, q_rows, nqb, nrb, rt, qt);
  const int lin = g.lin;
  const long long base = g.on ? g.p * Q * R + g.r : 0;
  double a = 0.0, b = 0.0;
  if (kind == kStatMinMax) {
    a = __hiloint2double(int(0x7ff00000u), 0);  // +inf
    b = -a;
  }
  if (g.on) {
    const double x0 = kind == kStatMoments ? double(to_acc(x[base])) : 0.0;
    for (int q = g.q0 + g.tq; q < g.q1; q += qt) {
      const double v = double(to_acc(x[base + (long long)q * R]));
      if (kind == kStatSumSquares) {
        a += v * v;
      } else if (kind == kStatMoments) {
        const double d = v - x0;
        a += d;
        b += d * d;
      } else {
        a = min_nan(a, v);
        b = max_nan(b, v);
      }
    }
  }
  s1[lin] = a;
  s2[lin] = b;
  __syncthreads();
  for (int h = qt >> 1; h > 0; h >>= 1) {
    if (g.tq < h) {
      const int o = lin + h * rt;
      if (kind == kStatMinMax) {
        s1[lin] = min_nan(s1[lin], s1[o]);
        s2[lin] = max_nan(s2[lin], s2[o]);
      } else {
        s1[lin] += s1[o];
        s2[lin] += s2[o];
      }
    }
    __syncthreads();
  }
  if (g.tq == 0 && g.on) {
    const long long o = (g.p * nqb + g.qb) * R + g.r;
    part1[o] = s1[lin];
    if (kind != kStatSumSquares) part2[o] = s2[lin];
  }
}

// One thread per group g = p * R + r: the partials combined in block order,
// then the op's coefficients (float64, rounded once to A), as
// fastreg/cpu/prox.py forms them:
//   group lasso   scale = |x_g| <= t ? 0 : 1 - t / |x_g|      (t = in_a[g] or c0)
//   max-norm      scale = min(|x_g|, c0) / (|x_g| + c1)       (1 for an all-zero group, c1 = 0)
//   standardize   fit: mean and std (scikit-learn's constant-feature rule, eps c0) into
//                 out_a/out_b; shift = mean, scale = 1 / std (in A, from the stored T values);
//                 apply: the same from in_a/in_b
//   min-max       fit: min and max into out_a/out_b; shift = min,
//                 scale = (c1 - c0) / range (range < c2: 1), offset = c0; apply: from in_a/in_b
template <typename T>
__device__ __forceinline__ void group_coefficients(
    int op, const double* __restrict__ part1, const double* __restrict__ part2, int nqb,
    long long G, int Q, int R, const T* __restrict__ x, const T* __restrict__ in_a,
    const T* __restrict__ in_b, double c0, double c1, double c2, T* __restrict__ out_a,
    T* __restrict__ out_b, typename Acc<T>::type* __restrict__ shift,
    typename Acc<T>::type* __restrict__ scale, typename Acc<T>::type* __restrict__ offset) {
  typedef typename Acc<T>::type A;
  const long long g = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= G) return;
  const long long p = g / R;
  const int r = int(g % R);
  double a = 0.0, b = 0.0;
  if (op != kStandardizeApply && op != kMinMaxApply) {
    const long long first = p * nqb * R + r;
    a = part1[first];
    if (op != kGroupL1 && op != kMaxNorm) b = part2[first];
    for (int k = 1; k < nqb; ++k) {
      const long long o = first + (long long)k * R;
      if (op == kMinMaxFit) {
        a = min_nan(a, part1[o]);
        b = max_nan(b, part2[o]);
      } else {
        a += part1[o];
        if (op == kStandardizeFit) b += part2[o];
      }
    }
  }
  A sh = A(0), sc = A(1), of = A(0);
  if (op == kGroupL1) {
    const double n = sqrt_rn(a);
    const double th = in_a != nullptr ? double(to_acc(in_a[g])) : c0;
    sc = A(n <= th ? 0.0 : 1.0 - th / n);  // NaN norm: NaN scale
  } else if (op == kMaxNorm) {
    const double n = sqrt_rn(a);
    sc = A(n + c1 == 0.0 ? 1.0 : (n > c0 ? c0 : n) / (n + c1));
  } else if (op == kStandardizeFit || op == kStandardizeApply) {
    if (op == kStandardizeFit) {
      const double m1 = a / Q;
      double var = b / Q - m1 * m1;
      var = var < 0.0 ? 0.0 : var;  // NaN stays NaN
      const double mean = double(to_acc(x[p * Q * R + r])) + m1;
      const double eps64 = 2.220446049250313e-16;
      const double tol = Q * mean * eps64;
      const bool constant = var <= Q * eps64 * var + tol * tol;
      out_a[g] = from_acc<T>(A(mean));
      out_b[g] = from_acc<T>(A(constant ? 1.0 : sqrt_rn(var + c0)));
      in_a = out_a;
      in_b = out_b;
    }
    sh = to_acc(in_a[g]);
    sc = div_rn(A(1), to_acc(in_b[g]));
  } else {
    if (op == kMinMaxFit) {
      out_a[g] = from_acc<T>(A(a));
      out_b[g] = from_acc<T>(A(b));
    } else {
      a = double(to_acc(in_a[g]));
      b = double(to_acc(in_b[g]));
    }
    double range = b - a;
    range = range < c2 ? 1.0 : range;
    sh = A(a);
    sc = A((c1 - c0) / range);
    of = A(c0);
  }
  shift[g] = sh;
  scale[g] = sc;
  offset[g] = of;
}

// y = (x - shift[g]) * scale[g] + offset[g] over the block's tile, one IEEE
// rounding per operation (the CPU's _affine_pqr). x and y may be the same array.
template <typename T>
__device__ __forceinline__ void group_apply(const T* x, T* y,
                                            const typename Acc<T>::type* __restrict__ shift,
                                            const typename Acc<T>::type* __restrict__ scale,
                                            const typename Acc<T>::type* __restrict__ offset,
                                            long long P, int Q, int R, int q_rows, int nqb,
                                            int nrb, int rt, int qt) {
  typedef typename Acc<T>::type A;
  const GroupTile g = group_tile(P, Q, R, q_rows, nqb, nrb, rt, qt);
  if (!g.on) return;
  const long long k = g.p * R + g.r;
  const A sh = shift[k], sc = scale[k], of = offset[k];
  const long long base = g.p * Q * R + g.r;
  for (int q = g.q0 + g.tq; q < g.q1; q += qt) {
    const long long i = base + (long long)q * R;
    y[i] = from_acc<T>(add_rn(mul_rn(sub_rn(to_acc(x[i]), sh), sc), of));
  }
}

}  // namespace fastreg

// ------------------------------------------------------------------ instances
// `vec` (0/1) picks the 16-byte or the scalar body once, at the top.
#define FASTREG_PROX_BY_VEC(f, targs, args) \
  if (vec) fastreg::f<FASTREG_PROX_UNPAREN targs, true> args; \
  else fastreg::f<FASTREG_PROX_UNPAREN targs, false> args
#define FASTREG_PROX_UNPAREN(...) __VA_ARGS__

#define FASTREG_CE_PARAMS(T)                                                                   \
  (const T* z, const long long* __restrict__ target, T* dz, double* __restrict__ row_loss,      \
   T* __restrict__ row_loss_t, const long long* __restrict__ count, double scale, double on,    \
   double off, long long ignore, int has_ignore, int M, int K, int R, int vec)
// Register path: the 16-byte and the scalar bodies are separate kernels, each
// allocated its own registers (together they overflowed the 64 of 1024 threads).
#define FASTREG_CE_ROWS(T, tag, KS, max_threads)                                               \
  FASTREG_KERNEL(cross_entropy_rows_k##KS##_##tag, max_threads, FASTREG_CE_PARAMS(T),           \
                 (fastreg::ce_rows<T, KS, true>(z, target, dz, row_loss, row_loss_t, count,     \
                                                scale, on, off, ignore, has_ignore, M, K, R)))  \
  FASTREG_KERNEL(cross_entropy_rows_k##KS##_scalar_##tag, max_threads, FASTREG_CE_PARAMS(T),    \
                 (fastreg::ce_rows<T, KS, false>(z, target, dz, row_loss, row_loss_t, count,    \
                                                 scale, on, off, ignore, has_ignore, M, K, R)))

#define FASTREG_PROX_INSTANCES(T, A, tag)                                                      \
  FASTREG_KERNEL(prox_elementwise_##tag, 256,                                                  \
                 (const T* x, T* y, long long n, const T* t, A t_value, int t_step, const T* l2, \
                  A l2_value, int l2_step, int shrink, int vec),                               \
                 FASTREG_PROX_BY_VEC(prox_elementwise, (T),                                    \
                                     (x, y, n, t, t_value, t_step, l2, l2_value, l2_step,      \
                                      shrink)))                                                \
  FASTREG_KERNEL(sgd_step_##tag, 256,                                                          \
                 (const long long* __restrict__ table, int tensors, long long chunk, A sign,    \
                  A wd, A mom, A damp1, A decay, A neglr, A th, int mode, int coupled,          \
                  int nesterov),                                                               \
                 (fastreg::sgd_step<T>(table, tensors, chunk,                                  \
                                       fastreg::SgdScalars<A>{sign, wd, mom, damp1, decay,     \
                                                              neglr, th},                      \
                                       mode, coupled, nesterov)))                              \
  FASTREG_KERNEL(adam_step_##tag, 256,                                                         \
                 (const long long* __restrict__ table, int tensors, long long chunk, A sign,    \
                  A wd, A decay, A lw, A lw1, A beta2, A omb2, A bc2s, A eps, A negss, A th,    \
                  int amsgrad, int coupled, int lerp_small),                                   \
                 (fastreg::adam_step<T>(table, tensors, chunk,                                 \
                                        fastreg::AdamScalars<A>{sign, wd, decay, lw, lw1,      \
                                                                beta2, omb2, bc2s, eps, negss, \
                                                                th},                           \
                                        amsgrad, coupled, lerp_small)))                        \
  FASTREG_CE_ROWS(T, tag, 1, 1024)                                                             \
  FASTREG_CE_ROWS(T, tag, 2, 1024)                                                             \
  FASTREG_KERNEL(cross_entropy_loop_##tag, 1024, FASTREG_CE_PARAMS(T),                          \
                 FASTREG_PROX_BY_VEC(ce_row_loop, (T), (z, target, dz, row_loss, row_loss_t,    \
                                                       count, scale, on, off, ignore,          \
                                                       has_ignore, K)))                        \
  FASTREG_KERNEL(cross_entropy_loss_##tag, 1024,                                               \
                 (const double* __restrict__ row_loss, int M,                                  \
                  const long long* __restrict__ count, int mean, T* __restrict__ out),          \
                 (fastreg::ce_loss<T>(row_loss, M, count, mean, out)))                         \
  FASTREG_KERNEL(group_stats_##tag, 256,                                                       \
                 (const T* __restrict__ x, int kind, long long P, int Q, int R, int q_rows,     \
                  int nqb, int nrb, int rt, int qt, double* __restrict__ part1,                 \
                  double* __restrict__ part2),                                                 \
                 (fastreg::group_stats<T>(x, kind, P, Q, R, q_rows, nqb, nrb, rt, qt, part1,    \
                                          part2)))                                             \
  FASTREG_KERNEL(group_coefficients_##tag, 256,                                                \
                 (int op, const double* __restrict__ part1, const double* __restrict__ part2,   \
                  int nqb, long long G, int Q, int R, const T* __restrict__ x,                 \
                  const T* __restrict__ in_a, const T* __restrict__ in_b, double c0, double c1, \
                  double c2, T* __restrict__ out_a, T* __restrict__ out_b,                     \
                  A* __restrict__ shift, A* __restrict__ scale, A* __restrict__ offset),        \
                 (fastreg::group_coefficients<T>(op, part1, part2, nqb, G, Q, R, x, in_a, in_b, \
                                                 c0, c1, c2, out_a, out_b, shift, scale,       \
                                                 offset)))                                     \
  FASTREG_KERNEL(group_apply_##tag, 256,                                                       \
                 (const T* x, T* y, const A* __restrict__ shift, const A* __restrict__ scale,   \
                  const A* __restrict__ offset, long long P, int Q, int R, int q_rows, int nqb, \
                  int nrb, int rt, int qt),                                                    \
                 (fastreg::group_apply<T>(x, y, shift, scale, offset, P, Q, R, q_rows, nqb,    \
                                          nrb, rt, qt)))

// Register-path rows (KS slots of 16 bytes per thread): KS = 1, 2 for every
// dtype at up to 1024 threads; float32 and float64 KS = 4 and float32 KS = 8 at
// 1024 threads (64 registers per thread: a float32 row of 32768 classes, the
// (8192, 32000) case, without spills); 16-bit KS = 4 and 8 at up to 512
// threads (the values unpacked from 8 halves per slot need the registers:
// at 1024 threads both NVRTC 13.5 and nvcc 13.0 spilled), rows of up to 32768.
// fastreg/cuda/prox.py's CE_SLOTS and kernel_names() mirror these lines.
FASTREG_PROX_INSTANCES(__half, float, f16)
FASTREG_CE_ROWS(__half, f16, 4, 512)
FASTREG_CE_ROWS(__half, f16, 8, 512)
FASTREG_PROX_INSTANCES(__nv_bfloat16, float, bf16)
FASTREG_CE_ROWS(__nv_bfloat16, bf16, 4, 512)
FASTREG_CE_ROWS(__nv_bfloat16, bf16, 8, 512)
FASTREG_PROX_INSTANCES(float, float, f32)
FASTREG_CE_ROWS(float, f32, 4, 1024)
FASTREG_CE_ROWS(float, f32, 8, 1024)
FASTREG_PROX_INSTANCES(double, double, f64)
FASTREG_CE_ROWS(double, f64, 4, 1024)
FASTREG_KERNEL(cross_entropy_count_i64, 1024,
               (const long long* __restrict__ target, int M, long long ignore,
                long long* __restrict__ count),
               (fastreg::ce_count(target, M, ignore, count)))
