// Philox4x32-10 and the stream of fastreg.random, on the device.
//
// The contract (fastreg/random.py states it exactly; the reference and the
// CPU implement the same): a call with (seed, offset) has the key
// (k0, k1) = (seed & 0xFFFFFFFF, seed >> 32); element i (the C-order index
// of the logical tensor) takes word i % 4 of the Philox4x32-10 block at the
// 64-bit counter n = offset + i / 4 (mod 2^64), laid out as the counter
// words (n & 0xFFFFFFFF, n >> 32, 0, 0). What the words become:
//   keep (dropout):  word >= threshold, threshold = floor(p * 2^32) compared
//                    in 64 bits (2^32 drops everything, 0 keeps everything);
//   uniform:         (word >> 8) * 2^-24, exact in float and double;
//   normal:          Box-Muller on the word pairs (0, 1) and (2, 3) of a
//                    block, in double: r = sqrt(-2 log(1 - u_a)),
//                    (z_a, z_b) = r * (cos 2 pi u_b, sin 2 pi u_b).
// The element -> (block, word) map depends on i alone, so any split of the
// elements over threads and blocks gives the same bits: the launch geometry
// never changes a random number.
//
// Normals: the words are the same bits everywhere; the doubles agree with
// the reference to the rounding of each platform's log, sqrt, sin and cos
// (here CUDA's log, sqrt and sincospi; sincospi(2 u) takes the angle in
// turns, so no rounding of 2 * pi * u enters; under the host emulation the
// host's libm). |z| <= sqrt(2 * 24 * ln 2) = 5.77.
//
// Cost: one block is 10 rounds of two 32 x 32 -> 64-bit multiplies, two
// three-way XORs and two key additions, about 60 instructions for 4 words.
#pragma once

namespace fastreg {

enum : unsigned {
  kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u,  // round multipliers
  kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u,  // Weyl key increments
};

// Philox4x32-10 of the counter c under the key (k0, k1).
__device__ __forceinline__ uint4 philox4x32_10(uint4 c, unsigned k0, unsigned k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    const unsigned hi0 = __umulhi(kPhiloxM0, c.x), lo0 = kPhiloxM0 * c.x;
    const unsigned hi1 = __umulhi(kPhiloxM1, c.z), lo1 = kPhiloxM1 * c.z;
    uint4 n;
    n.x = hi1 ^ c.y ^ k0;
    n.y = lo1;
    n.z = hi0 ^ c.w ^ k1;
    n.w = lo0;
    c = n;
  }
  return c;
}

// The stream of one call: key and first block.
struct Stream {
  unsigned k0, k1;
  unsigned long long offset;
};

// Block b of the stream (elements 4b .. 4b + 3): counter offset + b mod 2^64.
__device__ __forceinline__ uint4 stream_block(const Stream& s, unsigned long long b) {
  const unsigned long long n = s.offset + b;
  uint4 c;
  c.x = unsigned(n & 0xffffffffull);
  c.y = unsigned(n >> 32);
  c.z = 0u;
  c.w = 0u;
  return philox4x32_10(c, s.k0, s.k1);
}

// The dropout keep test, in 64 bits (threshold 2^32 keeps nothing).
__device__ __forceinline__ bool keeps(unsigned word, unsigned long long threshold) {
  return (unsigned long long)word >= threshold;
}

// The keep bits of a block's 4 words: bit j for word j.
__device__ __forceinline__ unsigned block_keep_bits(uint4 w, unsigned long long threshold) {
  return unsigned(keeps(w.x, threshold)) | (unsigned(keeps(w.y, threshold)) << 1) |
         (unsigned(keeps(w.z, threshold)) << 2) | (unsigned(keeps(w.w, threshold)) << 3);
}

// Keep bits of the L consecutive stream elements e0 .. e0 + L - 1 (L <= 28):
// bit j is element e0 + j. threshold 0 keeps everything without running
// Philox (inference and p = 0); the blocks are those the run overlaps, at
// most (L + 6) / 4, and the run's bits come out by one shift (no register
// array indexed at run time, so nothing goes to local memory).
template <int L>
__device__ __forceinline__ unsigned keep_bits_run(const Stream& s, unsigned long long e0,
                                                  unsigned long long threshold) {
  const unsigned all = L >= 32 ? 0xffffffffu : ((1u << L) - 1u);
  if (threshold == 0ull) return all;
  const unsigned long long b0 = e0 >> 2;
  const unsigned lead = unsigned(e0 & 3ull);
  const unsigned long long b_last = (e0 + L - 1) >> 2;
  unsigned long long bits = 0ull;
#pragma unroll
  for (int k = 0; k < (L + 6) / 4; ++k)
    if (b0 + k <= b_last)
      bits |= (unsigned long long)block_keep_bits(stream_block(s, b0 + k), threshold) << (4 * k);
  return unsigned(bits >> lead) & all;
}

// Uniform in [0, 1): (word >> 8) * 2^-24 (exact).
__device__ __forceinline__ double uniform24(unsigned word) { return double(word >> 8) * 0x1p-24; }

// The four standard normals of a block (Box-Muller on word pairs (0, 1) and (2, 3)).
__device__ __forceinline__ void box_muller(uint4 w, double (&z)[4]) {
  const unsigned a[2] = {w.x, w.z}, b[2] = {w.y, w.w};
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const double r = sqrt(-2.0 * log(1.0 - uniform24(a[p])));
    double sn, cs;
    sincospi(2.0 * uniform24(b[p]), &sn, &cs);  // 2 * u is exact: the angle in half turns
    z[2 * p] = r * cs;
    z[2 * p + 1] = r * sn;
  }
}

// 16-bit, float and double results from a double, rounded once (to nearest even).
template <typename T> struct FromDouble;
template <> struct FromDouble<double> {
  static __device__ __forceinline__ double from(double v) { return v; }
};
template <> struct FromDouble<float> {
  static __device__ __forceinline__ float from(double v) { return float(v); }
};
template <> struct FromDouble<__half> {
  static __device__ __forceinline__ __half from(double v) { return __double2half(v); }
};
template <> struct FromDouble<__nv_bfloat16> {
  static __device__ __forceinline__ __nv_bfloat16 from(double v) { return __double2bfloat16(v); }
};

}  // namespace fastreg
