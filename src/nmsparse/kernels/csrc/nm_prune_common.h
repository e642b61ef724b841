// Pieces that nm_prune.cpp's tile path (nm_prune_tiles.h) and its AVX2 row and plane paths (nm_prune_rows.h,
// nm_prune_planes.h) share: the (B, O, C, I) view, the methods' codes, the random draws, the in-register
// transposes of 8 groups of 4 floats.

#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif

namespace {

constexpr int MAXM = 32;

enum Method { MAGNITUDE = 0, RANDOM = 1, RESCALE = 2, RANDOM_UNBIASED = 3, MVUE = 4 };

struct View {
  int64_t B, O, C, I, sB, sO, sC, sI;
  View(const torch::Tensor& t) {
    B = t.size(0); O = t.size(1); C = t.size(2); I = t.size(3);
    sB = t.stride(0); sO = t.stride(1); sC = t.stride(2); sI = t.stride(3);
  }
  int64_t at(int64_t b, int64_t o, int64_t c, int64_t i) const { return b * sB + o * sO + c * sC + i * sI; }
};

// Work goes in tiles of W positions (W groups side by side): gathered into [m][W] arrays, decided
// by loops whose inner index is the lane (the compiler vectorizes them), scattered back. Lane flags are
// int, not bool: a select between floats on a byte-wide flag stays scalar (5x slower, measured).
constexpr int W = 8;  // one AVX2 vector of floats: 16 measured slower (larger unrolled code)

// kernels/draws.py hash32: a bijective mix of 32-bit words (uint32 arithmetic, so the lanes vectorize).
inline uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x21f0aaadu;
  x ^= x >> 15;
  x *= 0xd35a2d97u;
  return x ^ (x >> 15);
}

// Uniform number e of `key`: hash32(hash32(lo(e) ^ lo(key)) ^ hi(e) ^ hi(key)), its top 24 bits times 2^-24
// (exact in float32; kernels/draws.py hashed_uniforms). Through int32: AVX2 converts signed ints only.
inline float draw(uint64_t key, uint64_t e) {
  uint32_t x = hash32(static_cast<uint32_t>(e) ^ static_cast<uint32_t>(key));
  x = hash32(x ^ static_cast<uint32_t>(e >> 32) ^ static_cast<uint32_t>(key >> 32));
  return static_cast<float>(static_cast<int32_t>(x >> 8)) * (1.0f / 16777216.0f);
}

template <typename scalar_t>
using acc_type = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;

#ifdef __AVX__
// 8 groups of 4 floats in a row (q[4w + j]) to x[j][w] and back, in registers: one 32-byte store per x[j]. The
// compiler's own transpose stores 16-byte halves, which the 32-byte loads of the lane loops then cannot take
// from the store buffer (a store-forwarding stall per row: most of a 2:4 Linear prune's time, measured).
inline void transpose_8x4_in(const float* q, float (*x)[W]) {
  const __m256 a0 = _mm256_loadu_ps(q), a1 = _mm256_loadu_ps(q + 8), a2 = _mm256_loadu_ps(q + 16),
               a3 = _mm256_loadu_ps(q + 24);                       // groups (0|1), (2|3), (4|5), (6|7)
  const __m256 v0 = _mm256_permute2f128_ps(a0, a2, 0x20), v1 = _mm256_permute2f128_ps(a0, a2, 0x31),
               v2 = _mm256_permute2f128_ps(a1, a3, 0x20), v3 = _mm256_permute2f128_ps(a1, a3, 0x31);  // (0|4) .. (3|7)
  const __m256 t0 = _mm256_unpacklo_ps(v0, v1), t1 = _mm256_unpackhi_ps(v0, v1), t2 = _mm256_unpacklo_ps(v2, v3),
               t3 = _mm256_unpackhi_ps(v2, v3);
  _mm256_storeu_ps(x[0], _mm256_shuffle_ps(t0, t2, 0x44));
  _mm256_storeu_ps(x[1], _mm256_shuffle_ps(t0, t2, 0xEE));
  _mm256_storeu_ps(x[2], _mm256_shuffle_ps(t1, t3, 0x44));
  _mm256_storeu_ps(x[3], _mm256_shuffle_ps(t1, t3, 0xEE));
}

inline void transpose_4x8_out(const float (*y)[W], float* q) {
  const __m256 r0 = _mm256_loadu_ps(y[0]), r1 = _mm256_loadu_ps(y[1]), r2 = _mm256_loadu_ps(y[2]),
               r3 = _mm256_loadu_ps(y[3]);
  const __m256 u0 = _mm256_unpacklo_ps(r0, r1), u1 = _mm256_unpackhi_ps(r0, r1), u2 = _mm256_unpacklo_ps(r2, r3),
               u3 = _mm256_unpackhi_ps(r2, r3);
  const __m256 v0 = _mm256_shuffle_ps(u0, u2, 0x44), v1 = _mm256_shuffle_ps(u0, u2, 0xEE),
               v2 = _mm256_shuffle_ps(u1, u3, 0x44), v3 = _mm256_shuffle_ps(u1, u3, 0xEE);  // (0|4) .. (3|7)
  _mm256_storeu_ps(q, _mm256_permute2f128_ps(v0, v1, 0x20));
  _mm256_storeu_ps(q + 8, _mm256_permute2f128_ps(v2, v3, 0x20));
  _mm256_storeu_ps(q + 16, _mm256_permute2f128_ps(v0, v1, 0x31));
  _mm256_storeu_ps(q + 24, _mm256_permute2f128_ps(v2, v3, 0x31));
}
#endif

}  // namespace
