// Host emulation of the CUDA subset used by kernels/*.cu.
//
// The loader (fastreg/cuda/_emulator.py) prepends this header to a family's
// source and compiles the result with g++ into a shared library; ctypes then
// launches the very same kernels on NumPy arrays. It plays the part of
// Triton's interpreter mode or Numba's CUDA simulator: indexing, tails,
// barriers, warp collectives and the reduction orders run in CI, where there
// is no GPU.
//
// Execution model
//   Blocks run one after another (grid order), each by a team of blockDim
//   threads. Two schedulers run the same kernels:
//   - fibers (default): the block's threads are ucontext fibers on one OS
//     thread, switched at every barrier. On the 2-core development machine a
//     barrier cost ~0.17 us per thread arriving, against 1.0-1.7 us with OS
//     threads (std::barrier, 32-256 threads), and layer norm forward +
//     backward ran 6-20x faster (64x1024: 0.11-0.17 s vs 1.0-1.6 s; 16x65536:
//     0.8-1.2 s vs 19 s), which keeps the GPU tests to about a minute.
//     Fibers also make deadlocks detectable (no thread runnable) and
//     run the threads of even blocks in increasing and of odd blocks in
//     decreasing order, so a read of another thread's data that lacks a
//     barrier sees stale (poisoned) data in one of the two orders.
//   - threads (fastreg_emu_set_mode(1)): a persistent team of real OS
//     threads per launch, looping over the blocks, barriers on a mutex and
//     condition variables; tests run it to show results do not depend on the
//     scheduler.
//   A thread that returns from the kernel leaves the block's barriers
//   (arrive-and-drop), as exited threads do on sm_70+. Warp collectives
//   (__shfl_*_sync, votes, __syncwarp) exchange values through per-warp
//   slots between warp barriers; their mask must equal the warp's live lanes
//   (converged, full-warp collectives only: anything else is reported as an
//   error, since it is undefined or divergent on the GPU).
//   One launch runs at a time per library (a global lock): concurrent
//   launches from Python threads serialize.
//
// Memory: __shared__ variables are function statics (blocks never overlap,
// so a static is per-block storage); dynamic shared memory
// (FASTREG_DYNAMIC_SHARED in common.cuh) is a per-launch buffer refilled
// with 0xFF bytes (NaN for floating types) before every block. Limits
// checked as on sm_90 without opt-in: blockDim <= 1024 threads, dynamic
// shared memory <= 48 KiB.
//
// Numerics: float and double arithmetic is the host's IEEE arithmetic
// (no flush to zero; see fastreg/cuda/_source.py on CuPy's -ftz=true; no
// contraction into fused multiply-adds, which the GPU compiler may do except
// through the __f*_rn / __d*_rn intrinsics);
// rsqrtf/rsqrt are correctly rounded here and within 2 ulp on the GPU;
// float <-> __half / __nv_bfloat16 conversions round to nearest even with
// CUDA's bit patterns (NaN -> 0x7fff).
#pragma once
#define FASTREG_EMULATOR 1

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// ----------------------------------------------------------------------------- keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __syncthreads() ::fastreg_emu::syncthreads()

// ----------------------------------------------------------------------------- vector types
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __align__(8) float2 { float x, y; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(16) double2 { double x, y; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(16) int4 { int x, y, z, w; };
static const int warpSize = 32;

// ----------------------------------------------------------------------------- math and bit casts
__forceinline__ float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
__forceinline__ double rsqrt(double x) { return 1.0 / std::sqrt(x); }
template <class To, class From>
__forceinline__ To fastreg_emu_bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit cast between types of different sizes");
  To r;
  std::memcpy(&r, &v, sizeof(To));
  return r;
}
__forceinline__ float __uint_as_float(unsigned v) { return fastreg_emu_bit_cast<float>(v); }
__forceinline__ unsigned __float_as_uint(float v) { return fastreg_emu_bit_cast<unsigned>(v); }
__forceinline__ double __hiloint2double(int hi, int lo) {
  return fastreg_emu_bit_cast<double>((uint64_t(uint32_t(hi)) << 32) | uint32_t(lo));
}
__forceinline__ int __double2hiint(double v) { return int(fastreg_emu_bit_cast<uint64_t>(v) >> 32); }
__forceinline__ int __double2loint(double v) { return int(uint32_t(fastreg_emu_bit_cast<uint64_t>(v))); }
template <class T>
__forceinline__ T __ldg(const T* p) { return *p; }
// Cache hints (evict-first loads and stores) are plain accesses on the host.
template <class T>
__forceinline__ T __ldcs(const T* p) { return *p; }
template <class T>
__forceinline__ void __stcs(T* p, T v) { *p = v; }

// High word of the 32 x 32-bit product (Philox, kernels/philox.cuh).
__forceinline__ unsigned __umulhi(unsigned a, unsigned b) {
  return unsigned((uint64_t(a) * uint64_t(b)) >> 32);
}
// sin(pi x) and cos(pi x): the reduction to the nearest half turn is exact
// (x - q/2 is exact for |x| < 2^51), then the host's sin and cos.
__forceinline__ void sincospi(double x, double* s, double* c) {
  const double q = std::nearbyint(2.0 * x);
  const double a = 3.141592653589793 * (x - 0.5 * q);
  const double sa = std::sin(a), ca = std::cos(a);
  switch (int(std::fmod(q, 4.0) + 4.0) & 3) {
    case 0: *s = sa; *c = ca; break;
    case 1: *s = ca; *c = -sa; break;
    case 2: *s = -sa; *c = -ca; break;
    default: *s = -ca; *c = sa; break;
  }
}

// IEEE operations rounded to nearest even, never fused: the host's own
// arithmetic (the emulation compiles with -ffp-contract=off).
__forceinline__ float __fadd_rn(float a, float b) { return a + b; }
__forceinline__ float __fsub_rn(float a, float b) { return a - b; }
__forceinline__ float __fmul_rn(float a, float b) { return a * b; }
__forceinline__ float __fdiv_rn(float a, float b) { return a / b; }
__forceinline__ float __fsqrt_rn(float a) { return std::sqrt(a); }
__forceinline__ double __dadd_rn(double a, double b) { return a + b; }
__forceinline__ double __dsub_rn(double a, double b) { return a - b; }
__forceinline__ double __dmul_rn(double a, double b) { return a * b; }
__forceinline__ double __ddiv_rn(double a, double b) { return a / b; }
__forceinline__ double __dsqrt_rn(double a) { return std::sqrt(a); }

// ----------------------------------------------------------------------------- half / bfloat16
struct __half { unsigned short __x; };
struct __nv_bfloat16 { unsigned short __x; };

// float -> binary16, round to nearest even; overflow to inf, NaN to 0x7fff (as CUDA).
__forceinline__ unsigned short fastreg_emu_f32_to_f16(float f) {
  const uint32_t u = __float_as_uint(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return 0x7fffu;
  if (a >= 0x47800000u) return sign | 0x7c00u;  // >= 65536: inf (a == inf included)
  if (a >= 0x38800000u) {                      // normal binary16
    const uint32_t mant = a - 0x38000000u;      // rebias exponent 127 -> 15
    uint32_t h = mant >> 13;
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into inf
    return sign | h;
  }
  if (a < 0x33000000u) return sign;  // below half the smallest subnormal: zero
  // subnormal binary16 (ties at exactly half the smallest subnormal round to even: zero)
  const uint32_t exp = a >> 23;
  const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - exp;  // 14..24
  uint32_t h = mant >> shift;
  const uint32_t rem = mant & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (h & 1u))) ++h;
  return sign | h;
}
__forceinline__ float fastreg_emu_f16_to_f32(unsigned short h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (m << 13));
  if (e != 0) return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
  const float v = float(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
  return sign ? -v : v;
}
__forceinline__ __half __float2half_rn(float f) { return __half{fastreg_emu_f32_to_f16(f)}; }
__forceinline__ __half __float2half(float f) { return __float2half_rn(f); }
__forceinline__ float __half2float(__half h) { return fastreg_emu_f16_to_f32(h.__x); }
__forceinline__ unsigned short __half_as_ushort(__half h) { return h.__x; }
__forceinline__ __half __ushort_as_half(unsigned short v) { return __half{v}; }

__forceinline__ __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fffu};
  return __nv_bfloat16{static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
__forceinline__ __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
// double -> 16-bit rounded once: to float with round-to-odd (truncate, then set the
// last bit when inexact), which the float -> 16-bit rounding then leaves correct.
__forceinline__ float fastreg_emu_f64_to_f32_odd(double v) {
  float f = float(v);
  if (double(f) == v || v != v) return f;
  if (std::fabs(double(f)) > std::fabs(v)) f = std::nextafter(f, 0.0f);
  return __uint_as_float(__float_as_uint(f) | 1u);
}
__forceinline__ __half __double2half(double v) { return __float2half_rn(fastreg_emu_f64_to_f32_odd(v)); }
__forceinline__ __nv_bfloat16 __double2bfloat16(double v) {
  return __float2bfloat16_rn(fastreg_emu_f64_to_f32_odd(v));
}
__forceinline__ float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float(uint32_t(b.__x) << 16); }
__forceinline__ unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
__forceinline__ __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) { return __nv_bfloat16{v}; }

// ----------------------------------------------------------------------------- scheduler
namespace fastreg_emu {

enum State { READY, RUNNING, WAIT_BLOCK, WAIT_WARP, EXITED };
enum Mode { FIBERS = 0, THREADS = 1 };

struct Thread {
  uint3 idx;
  uint3 block;
  int linear, lane, warp;
  int phase;  // which of the warp's two slot rows the next collective uses
  State state;
  ucontext_t ctx;
};

struct Warp {
  uint32_t present;  // lanes that exist in this warp (a partial last warp has fewer)
  uint32_t live;     // lanes that have not returned from the kernel
  int arrived;
  unsigned gen;
  uint64_t slot[2][32];
  std::mutex m;
  std::condition_variable cv;
};

typedef void (*Thunk)(void*);

struct Launch {
  dim3 grid, block;
  int nthreads = 0, nwarps = 0;
  std::vector<Thread> threads;
  std::unique_ptr<Warp[]> warps;
  std::vector<unsigned char> dyn_shared;
  Thunk thunk = nullptr;
  void* thunk_arg = nullptr;
  int mode = FIBERS;
  // block barrier (threads mode: guarded by m)
  int live = 0, arrived = 0;
  unsigned gen = 0;
  std::mutex m;
  std::condition_variable cv;
  // team barrier between blocks (threads mode)
  int team_arrived = 0;
  unsigned team_gen = 0;
  bool team_stop = false;
  // fibers
  ucontext_t sched;
  unsigned char* stacks = nullptr;
  size_t stack_bytes = 0, stack_stride = 0;
  // errors: the first one wins
  std::atomic<bool> failed{false};
  std::mutex err_m;
  std::string error;
};

inline thread_local Thread* tls_thread = nullptr;
inline Launch* g_launch = nullptr;
inline int g_mode = FIBERS;
inline std::mutex g_launch_lock;
inline std::string g_last_error;
inline double g_barrier_timeout_s = 60.0;

inline void record_error(Launch& L, const std::string& what) {
  std::lock_guard<std::mutex> lk(L.err_m);
  if (L.failed.load()) return;
  const Thread* t = tls_thread;
  char where[160] = "";
  if (t)
    std::snprintf(where, sizeof where, " (block (%u,%u,%u), thread (%u,%u,%u))", t->block.x,
                  t->block.y, t->block.z, t->idx.x, t->idx.y, t->idx.z);
  L.error = what + where;
  L.failed.store(true);
}

// Fibers: the failing fiber parks for good and the scheduler abandons the launch.
// Threads: every waiter is woken; barriers then return at once, the kernels run
// to their end and the launch reports the error. Called holding no lock.
[[noreturn]] inline void fiber_park(Launch& L, Thread* t) {
  t->state = EXITED;
  swapcontext(&t->ctx, &L.sched);
  std::abort();  // never resumed
}

inline void fail(Launch& L, const std::string& what) {
  record_error(L, what);
  if (L.mode == FIBERS) fiber_park(L, tls_thread);
  { std::lock_guard<std::mutex> lk(L.m); }
  L.cv.notify_all();
  for (int w = 0; w < L.nwarps; ++w) {
    { std::lock_guard<std::mutex> lk(L.warps[w].m); }
    L.warps[w].cv.notify_all();
  }
}

inline int popcount(uint32_t v) { return __builtin_popcount(v); }

// ---- block barrier
inline void release_block(Launch& L) {
  L.arrived = 0;
  ++L.gen;
  if (L.mode == FIBERS) {
    for (auto& u : L.threads)
      if (u.state == WAIT_BLOCK) u.state = READY;
  } else {
    L.cv.notify_all();
  }
}

inline void syncthreads() {
  Launch& L = *g_launch;
  Thread* t = tls_thread;
  if (L.mode == FIBERS) {
    if (++L.arrived == L.live) {
      release_block(L);
      return;
    }
    t->state = WAIT_BLOCK;
    swapcontext(&t->ctx, &L.sched);
    return;
  }
  bool timed_out = false;
  {
    std::unique_lock<std::mutex> lk(L.m);
    if (L.failed.load()) return;
    if (++L.arrived == L.live) {
      release_block(L);
      return;
    }
    const unsigned g = L.gen;
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration<double>(g_barrier_timeout_s);
    timed_out = !L.cv.wait_until(lk, deadline, [&] { return L.gen != g || L.failed.load(); });
  }
  if (timed_out)
    fail(L, "__syncthreads() timed out: a deadlock (threads of the block wait at different barriers)");
}

// ---- warp barrier; collectives must name exactly the warp's live lanes
inline bool mask_ok(Launch& L, Warp& w, unsigned mask, const char* what, std::string* msg) {
  if (mask == w.live) return true;
  char buf[220];
  std::snprintf(buf, sizeof buf,
                "%s with mask 0x%08x but the warp's live lanes are 0x%08x: only converged "
                "full-warp collectives are emulated",
                what, mask, w.live);
  *msg = buf;
  return false;
}

inline void warp_barrier(unsigned mask, const char* what) {
  Launch& L = *g_launch;
  Thread* t = tls_thread;
  Warp& w = L.warps[t->warp];
  std::string msg;
  if (L.mode == FIBERS) {
    if (!mask_ok(L, w, mask, what, &msg)) fail(L, msg);
    if (++w.arrived == popcount(w.live)) {
      w.arrived = 0;
      ++w.gen;
      for (int i = 0; i < 32; ++i) {
        const int k = t->warp * 32 + i;
        if (k < L.nthreads && L.threads[k].state == WAIT_WARP) L.threads[k].state = READY;
      }
      return;
    }
    t->state = WAIT_WARP;
    swapcontext(&t->ctx, &L.sched);
    return;
  }
  bool bad = false, timed_out = false;
  {
    std::unique_lock<std::mutex> lk(w.m);
    if (L.failed.load()) return;
    if (!mask_ok(L, w, mask, what, &msg)) {
      bad = true;
    } else if (++w.arrived == popcount(w.live)) {
      w.arrived = 0;
      ++w.gen;
      w.cv.notify_all();
      return;
    } else {
      const unsigned g = w.gen;
      const auto deadline = std::chrono::steady_clock::now() +
                            std::chrono::duration<double>(g_barrier_timeout_s);
      timed_out = !w.cv.wait_until(lk, deadline, [&] { return w.gen != g || L.failed.load(); });
    }
  }
  if (bad) fail(L, msg);
  if (timed_out) fail(L, std::string(what) + " timed out: a deadlock");
}

// A thread leaves the kernel: it drops out of the block barrier (the others
// no longer wait for it); leaving while its warp has a collective pending is
// an error (it would hang or be undefined on the GPU).
inline void thread_exit() {
  Launch& L = *g_launch;
  Thread* t = tls_thread;
  Warp& w = L.warps[t->warp];
  const char* lane_error = "a lane returned while its warp waited in a warp collective";
  if (L.mode == FIBERS) {
    --L.live;
    if (L.arrived > 0 && L.arrived == L.live) release_block(L);
    w.live &= ~(1u << t->lane);
    if (w.arrived > 0) fail(L, lane_error);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(L.m);
    --L.live;
    if (L.arrived > 0 && L.arrived == L.live) release_block(L);
  }
  bool bad;
  {
    std::lock_guard<std::mutex> lk(w.m);
    w.live &= ~(1u << t->lane);
    bad = w.arrived > 0;
  }
  if (bad) fail(L, lane_error);
}

// ---- collectives through the warp's slots: write, barrier, read; the two
// slot rows alternate, so a fast lane never overwrites a value a slow lane
// has still to read (between two uses of a row lies a barrier all passed).
template <class T>
inline T exchange(unsigned mask, T v, int src, const char* what) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value,
                "warp collectives move trivially copyable values of up to 8 bytes");
  Launch& L = *g_launch;
  Thread* t = tls_thread;
  Warp& w = L.warps[t->warp];
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  const int row = t->phase;
  t->phase ^= 1;
  w.slot[row][t->lane] = bits;
  warp_barrier(mask, what);
  if (L.failed.load()) return v;
  // mask equals the live lanes at the barrier (checked there); a lane may exit right after it
  if (!((mask >> src) & 1u)) fail(L, std::string(what) + " reads a lane outside its mask");
  T r;
  std::memcpy(&r, &w.slot[row][src], sizeof(T));
  return r;
}

}  // namespace fastreg_emu

#define threadIdx (::fastreg_emu::tls_thread->idx)
#define blockIdx (::fastreg_emu::tls_thread->block)
#define blockDim (::fastreg_emu::g_launch->block)
#define gridDim (::fastreg_emu::g_launch->grid)

__forceinline__ void __syncwarp(unsigned mask = 0xffffffffu) {
  ::fastreg_emu::warp_barrier(mask, "__syncwarp");
}
template <class T>
__forceinline__ T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  const int lane = ::fastreg_emu::tls_thread->lane;
  const int src = (lane & ~(width - 1)) + (src_lane & (width - 1));
  return ::fastreg_emu::exchange(mask, v, src, "__shfl_sync");
}
template <class T>
__forceinline__ T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::fastreg_emu::tls_thread->lane;
  int src = lane ^ lane_mask;
  if (src >= ((lane / width) + 1) * width) src = lane;  // later groups: own value
  return ::fastreg_emu::exchange(mask, v, src, "__shfl_xor_sync");
}
template <class T>
__forceinline__ T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::fastreg_emu::tls_thread->lane;
  int src = lane + int(delta);
  if (src >= ((lane / width) + 1) * width) src = lane;
  return ::fastreg_emu::exchange(mask, v, src, "__shfl_down_sync");
}
template <class T>
__forceinline__ T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::fastreg_emu::tls_thread->lane;
  int src = lane - int(delta);
  if (src < (lane / width) * width) src = lane;
  return ::fastreg_emu::exchange(mask, v, src, "__shfl_up_sync");
}
__forceinline__ unsigned __ballot_sync(unsigned mask, int pred) {
  using namespace ::fastreg_emu;
  Launch& L = *g_launch;
  Thread* t = tls_thread;
  Warp& w = L.warps[t->warp];
  const int row = t->phase;
  t->phase ^= 1;
  w.slot[row][t->lane] = pred ? 1u : 0u;
  warp_barrier(mask, "__ballot_sync");
  unsigned r = 0;
  for (int i = 0; i < 32; ++i)
    if (((mask >> i) & 1u) && w.slot[row][i]) r |= 1u << i;
  return r;
}
__forceinline__ int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
__forceinline__ int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }

namespace fastreg_emu {

inline unsigned char* dynamic_shared() { return g_launch->dyn_shared.data(); }

inline void start_block(Launch& L, uint3 b) {
  L.live = L.nthreads;
  L.arrived = 0;
  for (int w = 0; w < L.nwarps; ++w) {
    L.warps[w].live = L.warps[w].present;
    L.warps[w].arrived = 0;
  }
  std::memset(L.dyn_shared.data(), 0xFF, L.dyn_shared.size());
  for (auto& t : L.threads) {
    t.block = b;
    t.phase = 0;
  }
}

inline uint3 block_index(const Launch& L, long long i) {
  const long long gx = L.grid.x, gy = L.grid.y;
  return uint3{unsigned(i % gx), unsigned((i / gx) % gy), unsigned(i / (gx * gy))};
}

// A fiber runs the kernel once per block: after each run it parks (EXITED)
// and the scheduler makes it READY again for the next block.
inline void fiber_main() {
  Launch& L = *g_launch;
  Thread* t = tls_thread;
  for (;;) {
    L.thunk(L.thunk_arg);
    thread_exit();
    t->state = EXITED;
    swapcontext(&t->ctx, &L.sched);
  }
}

inline void describe_deadlock(Launch& L) {
  int wb = 0, ww = 0;
  for (auto& t : L.threads) {
    wb += t.state == WAIT_BLOCK;
    ww += t.state == WAIT_WARP;
  }
  char buf[220];
  std::snprintf(buf, sizeof buf,
                "deadlock: %d threads wait in __syncthreads() and %d in warp collectives, "
                "none can run (a barrier in divergent code?)",
                wb, ww);
  tls_thread = nullptr;
  record_error(L, buf);
}

inline void run_fibers(Launch& L) {
  for (auto& t : L.threads) {
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = L.stacks + size_t(t.linear) * L.stack_stride;
    t.ctx.uc_stack.ss_size = L.stack_bytes;
    t.ctx.uc_link = nullptr;
    makecontext(&t.ctx, fiber_main, 0);
  }
  const long long nblocks = (long long)L.grid.x * L.grid.y * L.grid.z;
  for (long long b = 0; b < nblocks && !L.failed.load(); ++b) {
    start_block(L, block_index(L, b));
    for (auto& t : L.threads) t.state = READY;
    const bool reverse = (b & 1) != 0;
    while (L.live > 0 && !L.failed.load()) {
      bool ran = false;
      for (int k = 0; k < L.nthreads && !L.failed.load(); ++k) {
        Thread& t = L.threads[reverse ? L.nthreads - 1 - k : k];
        if (t.state != READY) continue;
        ran = true;
        t.state = RUNNING;
        tls_thread = &t;
        swapcontext(&L.sched, &t.ctx);
      }
      tls_thread = nullptr;
      if (!ran && L.live > 0 && !L.failed.load()) describe_deadlock(L);
    }
  }
  tls_thread = nullptr;
}

// Threads mode: all threads meet between blocks; the last to arrive sets up
// the next block and decides for everyone whether to stop (after an error).
inline bool team_barrier(Launch& L, long long next_block) {
  std::unique_lock<std::mutex> lk(L.m);
  if (++L.team_arrived == L.nthreads) {
    L.team_arrived = 0;
    L.team_stop = L.failed.load() || next_block < 0;
    if (!L.team_stop) start_block(L, block_index(L, next_block));
    ++L.team_gen;
    L.cv.notify_all();
    return L.team_stop;
  }
  const unsigned g = L.team_gen;
  L.cv.wait(lk, [&] { return L.team_gen != g; });
  return L.team_stop;
}

inline void run_threads(Launch& L) {
  const long long nblocks = (long long)L.grid.x * L.grid.y * L.grid.z;
  std::vector<std::thread> team;
  team.reserve(L.nthreads);
  for (int i = 0; i < L.nthreads; ++i) {
    team.emplace_back([&L, i, nblocks] {
      tls_thread = &L.threads[i];
      for (long long b = 0; b < nblocks; ++b) {
        if (team_barrier(L, b)) break;
        L.thunk(L.thunk_arg);
        thread_exit();
      }
      tls_thread = nullptr;
    });
  }
  for (auto& th : team) th.join();
}

// Runs thunk(arg) as every thread of every block; returns 0 or -1 (message in g_last_error).
inline int run(const unsigned* grid, const unsigned* block, unsigned long long shmem, Thunk thunk,
               void* arg) {
  std::lock_guard<std::mutex> guard(g_launch_lock);
  g_last_error.clear();
  const long long nthreads = (long long)block[0] * block[1] * block[2];
  char buf[220];
  if (nthreads < 1 || nthreads > 1024 || block[2] > 64) {
    std::snprintf(buf, sizeof buf, "invalid block (%u, %u, %u): 1 to 1024 threads, z <= 64",
                  block[0], block[1], block[2]);
    g_last_error = buf;
    return -1;
  }
  if (grid[0] < 1 || grid[0] > 2147483647u || grid[1] < 1 || grid[2] < 1 || grid[1] > 65535 ||
      grid[2] > 65535) {
    std::snprintf(buf, sizeof buf, "invalid grid (%u, %u, %u)", grid[0], grid[1], grid[2]);
    g_last_error = buf;
    return -1;
  }
  if (shmem > 48u * 1024u) {
    std::snprintf(buf, sizeof buf,
                  "%llu bytes of dynamic shared memory: more than the 48 KiB a launch gets "
                  "without opt-in",
                  shmem);
    g_last_error = buf;
    return -1;
  }
  Launch L;
  L.grid = dim3(grid[0], grid[1], grid[2]);
  L.block = dim3(block[0], block[1], block[2]);
  L.nthreads = int(nthreads);
  L.nwarps = (L.nthreads + 31) / 32;
  L.threads.resize(L.nthreads);
  L.warps.reset(new Warp[L.nwarps]);
  for (int i = 0; i < L.nthreads; ++i) {
    Thread& t = L.threads[i];
    t.linear = i;
    t.idx = uint3{unsigned(i % block[0]), unsigned((i / block[0]) % block[1]),
                  unsigned(i / (block[0] * block[1]))};
    t.lane = i % 32;
    t.warp = i / 32;
  }
  for (int w = 0; w < L.nwarps; ++w) {
    const int n = std::min(32, L.nthreads - 32 * w);
    L.warps[w].present = n == 32 ? 0xffffffffu : ((1u << n) - 1u);
    L.warps[w].gen = 0;
  }
  L.dyn_shared.assign(size_t(shmem) + 16, 0xFF);
  L.thunk = thunk;
  L.thunk_arg = arg;
  L.mode = g_mode;
  g_launch = &L;
  if (L.mode == FIBERS) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    L.stack_bytes = 128 * 1024;
    L.stack_stride = L.stack_bytes + page;  // a guard page below each stack
    const size_t total = L.stack_stride * size_t(L.nthreads);
    void* mem = mmap(nullptr, total, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
      g_last_error = "could not map fiber stacks";
      g_launch = nullptr;
      return -1;
    }
    unsigned char* base = static_cast<unsigned char*>(mem);
    for (int i = 0; i < L.nthreads; ++i) mprotect(base + size_t(i) * L.stack_stride, page, PROT_NONE);
    L.stacks = base + page;
    run_fibers(L);
    munmap(mem, total);
  } else {
    run_threads(L);
  }
  g_launch = nullptr;
  if (L.failed.load()) {
    g_last_error = L.error;
    return -1;
  }
  return 0;
}

// ---- launching a kernel from a void** argument array (cuLaunchKernel's convention)
template <class A>
using arg_t = typename std::remove_cv<typename std::remove_reference<A>::type>::type;

template <class... A, size_t... I>
inline void call(void (*k)(A...), void** args, std::index_sequence<I...>) {
  k(*static_cast<arg_t<A>*>(args[I])...);
}

template <class... A>
inline int launch(void (*k)(A...), const unsigned* grid, const unsigned* block,
                  unsigned long long shmem, void** args) {
  struct Ctx {
    void (*k)(A...);
    void** args;
  } ctx{k, args};
  return run(grid, block, shmem,
             [](void* p) {
               Ctx* c = static_cast<Ctx*>(p);
               call(c->k, c->args, std::index_sequence_for<A...>{});
             },
             &ctx);
}

// One character per parameter, checked by the Python side before a launch:
// p pointer, i int32, I uint32, l int64, L uint64, f float, d double.
template <class T>
constexpr char type_code() {
  return std::is_pointer<T>::value ? 'p'
         : std::is_same<T, float>::value ? 'f'
         : std::is_same<T, double>::value ? 'd'
         : (std::is_integral<T>::value && sizeof(T) == 4) ? (std::is_signed<T>::value ? 'i' : 'I')
         : (std::is_integral<T>::value && sizeof(T) == 8) ? (std::is_signed<T>::value ? 'l' : 'L')
         : '?';
}
template <class... A>
inline const char* signature(void (*)(A...)) {
  static const char s[] = {type_code<arg_t<A>>()..., '\0'};
  return s;
}

}  // namespace fastreg_emu

extern "C" {
const char* fastreg_emu_last_error() { return fastreg_emu::g_last_error.c_str(); }
void fastreg_emu_set_mode(int mode) { fastreg_emu::g_mode = mode; }
void fastreg_emu_set_barrier_timeout(double seconds) { fastreg_emu::g_barrier_timeout_s = seconds; }
}

// Emitted after each extern "C" kernel by FASTREG_INSTANCE (common.cuh).
#define FASTREG_EMU_LAUNCHER(name)                                                           \
  extern "C" int fastreg_launch_##name(const unsigned* grid, const unsigned* block,          \
                                       unsigned long long shmem, void** args) {              \
    return ::fastreg_emu::launch(&name, grid, block, shmem, args);                           \
  }                                                                                          \
  extern "C" const char* fastreg_signature_##name() { return ::fastreg_emu::signature(&name); }
