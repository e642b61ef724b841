// N:M masks and SDGP gradient pruning on the CPU in one pass over the tensor.
//
// Built on first use by nmsparse.kernels.native_prune (kernels/_extensions.py). The torch path
// (patterns.nm, kernels.reference, kernels.unbiased) runs a method as a dozen whole-tensor passes
// (abs, m(m-1)/2 compares, where, the norms of rescale; mvue's water-filling column by column);
// here every group of m is read once, decided in registers and written once.
//
// Layout: the caller views the tensor as (B, O, C, I) with any strides (channels are dim 2, grouped
// by m consecutive channels; B is the sample dim that rescale's planes keep, O and I the other dims
// before and after the channels). Random draws are hashes of (the caller's key, a counter): one word of
// the layer's generator per call (kernels/draws.py, which the torch path computes the same way: see draw),
// numbered in the channels-last order of the torch path: entry (b, o, c, i) -> ((b*O + o)*I + i)*C + c, group (b, o, g, i) -> ((b*O + o)*I + i)*G + g.
//
// Every method gives the torch path's values exactly (same keys, same tie rule: equal keys go to
// the earlier position; NaN ranks as +inf; float32 arithmetic, float64 for float64 tensors, in the
// torch path's order), except rescale's scale, whose plane sums are added in another order (a
// rounding of the sum). Compile with -ffp-contract=off so no multiply-add is fused, and -fno-trapping-math
// so lane loops may compute a division in every lane and select (no value changes).

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

// Branch-free tests (std::isnan / std::isfinite keep the loops that use them from vectorizing).
template <typename acc_t>
inline bool finite(acc_t x) { return std::abs(x) <= std::numeric_limits<acc_t>::max(); }

template <typename acc_t>
inline acc_t magnitude_key(acc_t x) {
  const acc_t a = std::abs(x);
  return a == a ? a : std::numeric_limits<acc_t>::infinity();  // NaN ranks as +inf
}

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

// keep[j][w] = the n largest keys of lane w (ties to the earlier position), by pairwise comparison.
template <typename key_t, int MT>
inline void top_n(const key_t (*key)[W], int m_arg, int n, int (*keep)[W]) {
  const int m = MT ? MT : m_arg;
  for (int j = 0; j < m; ++j) {
    int rank[W] = {0};
    for (int k = 0; k < j; ++k)
      for (int w = 0; w < W; ++w) rank[w] += key[k][w] >= key[j][w];
    for (int k = j + 1; k < m; ++k)
      for (int w = 0; w < W; ++w) rank[w] += key[k][w] > key[j][w];
    for (int w = 0; w < W; ++w) keep[j][w] = rank[w] < n;
  }
}

// The W lanes of a tile as one vector (GCC/Clang vector extensions): the mvue tile keeps its state in
// registers. Written as lane loops over [m][W] arrays, the compiler vectorized some loops 16 bytes wide and
// others 32, and every 32-byte load of a row stored as two 16-byte halves stalled (store forwarding).
template <typename acc_t>
struct Lane {
  typedef acc_t V __attribute__((vector_size(W * sizeof(acc_t))));
  using M = decltype(V{} < V{});  // a lane mask: -1 or 0, integers as wide as acc_t
  static V load(const acc_t* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
  static void store(acc_t* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static V splat(acc_t x) { return V{} + x; }
  static V ceil(V v) {
#ifdef __AVX__
    if constexpr (std::is_same<acc_t, float>::value && sizeof(V) == 32)
      return (V)_mm256_round_ps((__m256)v, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
#endif
    for (int w = 0; w < W; ++w) v[w] = std::ceil(v[w]);
    return v;
  }
  static bool any(M m) {
    bool out = false;
    for (int w = 0; w < W; ++w) out |= m[w] != 0;
    return out;
  }
};

// The minimum-variance unbiased n-of-m choice of kernels/unbiased.py's _mvue_columns, lane by lane,
// in its order of operations: water-filling inclusion probabilities, systematic sampling with u.
// STOP: end the water-filling once a round caps nothing. Such a round leaves r and s as they were, so the
// rounds after it change nothing; for n <= 2 running them is cheaper than the test (a branch that mispredicts).
template <typename acc_t, int MT, bool STOP>
inline void mvue_tile(const acc_t (*__restrict__ x)[W], int m_arg, int n, const acc_t* __restrict__ u_in,
                      acc_t (*__restrict__ y)[W]) {
  using L = Lane<acc_t>;
  using V = typename L::V;
  using M = typename L::M;
  const int m = MT ? MT : m_arg;
  constexpr int MA = MT ? MT : MAXM;  // arrays of the constant size stay in registers
  const V zero = V{}, one = L::splat(1), nv = L::splat(acc_t(n));
  const M no_sign = M{} + std::numeric_limits<std::remove_reference_t<decltype(M{}[0])>>::max();
  V a[MA];
  M fin[MA], capped[MA];
  M nz = M{};
  for (int j = 0; j < m; ++j) {
    const V v = L::load(x[j]);
    const V av = (V)((M)v & no_sign);  // |x| as std::abs: the sign bit cleared (NaN stays NaN, fails the test below)
    fin[j] = av <= L::splat(std::numeric_limits<acc_t>::max());
    a[j] = fin[j] ? av : zero;
    nz -= a[j] > zero;  // a true mask is -1
    capped[j] = M{};
  }
  const M few = nz <= M{} + n;
  V s = a[0], r = nv;
  for (int j = 1; j < m; ++j) s += a[j];
  if (n > 1) {  // with n = 1, c * a_i = a_i / S <= 1: nothing is ever capped
    for (int round = 0; round < n; ++round) {
      const V c = r / s;
      M grew = M{};
      for (int j = 0; j < m; ++j) {
        const M nw = ~capped[j] & ~few & (a[j] * c > one);
        capped[j] |= nw;
        grew |= nw;
      }
      if (STOP && !L::any(grew)) break;
      V nc = zero, t = zero;
      for (int j = 0; j < m; ++j) {
        nc += capped[j] ? one : zero;
        t += capped[j] ? zero : a[j];
      }
      r = nv - nc;
      s = t;
    }
  }
  r = few ? zero : r;
  const M pos_r = r > zero;
  const V ratio = pos_r ? r / s : zero, mag = pos_r ? s / r : zero;  // computed in every lane, then selected
  const V u = L::load(u_in);
  V q[MA];
  M last = M{} - 1;
  for (int j = 0; j < m; ++j) {
    q[j] = (capped[j] | few) ? zero : a[j] * ratio;
    last = q[j] > zero ? M{} + j : last;
  }
  V cum = zero, prev = L::ceil(-u);
  for (int j = 0; j < m; ++j) {
    cum += q[j];
    const V end = cum < r ? cum : r;  // min(cum, r) as torch.minimum (no NaN here)
    const V now = L::ceil((last <= j ? r : end) - u);
    const M drawn = (now > prev) & (q[j] > zero);
    prev = now;
    const V g = L::load(x[j]);
    const V sign = g > zero ? one : (g < zero ? -one : zero);
    const M keep = capped[j] | few | ~fin[j];
    L::store(y[j], keep ? g : sign * mag * (drawn ? one : zero));
  }
}

// A tile: `count` groups side by side, lane w's group starting at element off + w * step, its first
// entry numbered key + w * key_step in channels-last order (random keys: + j), the group itself
// grp + w * grp_step (mvue's uniform), its first channel c0 + w * c_step.
struct Lanes {
  int count;
  int64_t off, step, key, key_step, grp, grp_step, c0, c_step;
  int64_t at(int w, int j, int64_t sC) const { return off + w * step + j * sC; }
  // W whole groups of MT side by side in a row (a Linear gradient): q[w * MT + j], a transpose of W * MT values
  template <int MT>
  bool whole_row(int64_t sC) const { return MT && count == W && step == MT && sC == 1; }
};

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

#ifdef __AVX2__
// n:4 along a contiguous float32 row, 8 entries (two groups, one per 128-bit lane) per vector, with no transpose:
// an entry's rank is how many of its group beat it (a larger key, or an equal one earlier), counted against the
// key vector's three in-lane rotations. keep: rank < n, as -1 / 0 lanes.
inline __m256i row4_keep_key(__m256 key, int n) {
  // rotation r sets entry k = (j + r) % 4 beside entry j; k < j (an equal key beats j) for j >= 4 - r
  const __m256 k1 = _mm256_permute_ps(key, _MM_SHUFFLE(0, 3, 2, 1));
  const __m256 k2 = _mm256_permute_ps(key, _MM_SHUFFLE(1, 0, 3, 2));
  const __m256 k3 = _mm256_permute_ps(key, _MM_SHUFFLE(2, 1, 0, 3));
  const __m256 b1 = _mm256_blend_ps(_mm256_cmp_ps(k1, key, _CMP_GT_OQ), _mm256_cmp_ps(k1, key, _CMP_GE_OQ), 0x88);
  const __m256 b2 = _mm256_blend_ps(_mm256_cmp_ps(k2, key, _CMP_GT_OQ), _mm256_cmp_ps(k2, key, _CMP_GE_OQ), 0xCC);
  const __m256 b3 = _mm256_blend_ps(_mm256_cmp_ps(k3, key, _CMP_GT_OQ), _mm256_cmp_ps(k3, key, _CMP_GE_OQ), 0xEE);
  const __m256i beaten = _mm256_add_epi32(_mm256_add_epi32(_mm256_castps_si256(b1), _mm256_castps_si256(b2)),
                                          _mm256_castps_si256(b3));  // a true compare is -1: this is -rank
  return _mm256_cmpgt_epi32(beaten, _mm256_set1_epi32(-n));
}

// magnitude's key: |x|, NaN as +inf (magnitude_key)
inline __m256i row4_keep(__m256 x, int n) {
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  return row4_keep_key(_mm256_blendv_ps(a, _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                                        _mm256_cmp_ps(a, a, _CMP_UNORD_Q)), n);
}

inline __m256i hash32v(__m256i x) {  // hash32 in 8 lanes
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int32_t>(0x21f0aaadu)));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, _mm256_set1_epi32(static_cast<int32_t>(0xd35a2d97u)));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
}

// draw(key, e + w) for w = 0..7, as draw computes it (the entries' high words are e's: the caller checks)
inline __m256 draw8(uint64_t key, uint64_t e) {
  const __m256i lo = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(e))),
                                      _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i x = hash32v(_mm256_xor_si256(lo, _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(key)))));
  x = hash32v(_mm256_xor_si256(x, _mm256_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(e >> 32) ^
                                                                         static_cast<uint32_t>(key >> 32)))));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(x, 8)), _mm256_set1_ps(1.0f / 16777216.0f));
}

// One vector of a row pruned: magnitude, or random / random-unbiased from the draws of entries e.. (a non-finite
// entry's key is 2, above any draw); pruned entries 0, kept ones g (times m / n for random-unbiased).
inline __m256 row4_pruned(__m256 x, int n, int method, uint64_t rnd, uint64_t e, float unbiased) {
  if (method == MAGNITUDE) return _mm256_and_ps(x, _mm256_castsi256_ps(row4_keep(x, n)));
  __m256 d;
  if (static_cast<uint32_t>(e) <= 0xFFFFFFFFu - 7u) {
    d = draw8(rnd, e);
  } else {  // the entries' numbers cross a multiple of 2^32
    alignas(32) float v[8];
    for (int w = 0; w < 8; ++w) v[w] = draw(rnd, e + w);
    d = _mm256_load_ps(v);
  }
  const __m256 a = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  const __m256 fin = _mm256_cmp_ps(a, _mm256_set1_ps(std::numeric_limits<float>::max()), _CMP_LE_OQ);
  const __m256i keep = row4_keep_key(_mm256_blendv_ps(_mm256_set1_ps(2.0f), d, fin), n);
  if (method == RANDOM_UNBIASED) x = _mm256_mul_ps(x, _mm256_set1_ps(unbiased));
  return _mm256_and_ps(x, _mm256_castsi256_ps(keep));
}

// The row pruned into out (a kept -0.0 stays -0.0); e: the number of its first entry (random keys).
inline void prune_row4(const float* g, float* out, int64_t C, int n, int method = MAGNITUDE, uint64_t rnd = 0,
                       uint64_t e = 0, float unbiased = 1.0f) {
  int64_t c = 0;
  for (; c + 8 <= C; c += 8)
    _mm256_storeu_ps(out + c, row4_pruned(_mm256_loadu_ps(g + c), n, method, rnd, e + c, unbiased));
  if (c < C) {  // one group left (C % 8 == 4): the low lane
    const __m256 x = _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_loadu_ps(g + c), 0);
    _mm_storeu_ps(out + c, _mm256_castps256_ps128(row4_pruned(x, n, method, rnd, e + c, unbiased)));
  }
}

// The row's mask as bytes 1 / 0.
inline void mask_row4(const float* g, bool* out, int64_t C, int n) {
  auto bytes = [](__m256i keep) {
    const __m256i one = _mm256_and_si256(keep, _mm256_set1_epi32(1));
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(one), _mm256_extracti128_si256(one, 1));
    return _mm_packus_epi16(w, w);  // the 8 flags in order in the low 8 bytes
  };
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) _mm_storel_epi64(reinterpret_cast<__m128i*>(out + c), bytes(row4_keep(_mm256_loadu_ps(g + c), n)));
  if (c < C) {
    const __m256 x = _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_loadu_ps(g + c), 0);
    const int32_t four = _mm_cvtsi128_si32(bytes(row4_keep(x, n)));
    std::memcpy(out + c, &four, 4);
  }
}

// sum |x| over a row of C floats (C % 4 == 0), in 8 partial sums (so another order than a scalar loop's)
inline float abs_sum_row4(const float* x, int64_t C) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 acc = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) acc = _mm256_add_ps(acc, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + c)));
  if (c < C) acc = _mm256_add_ps(acc, _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_andnot_ps(_mm_set1_ps(-0.0f),
                                                                                                _mm_loadu_ps(x + c)), 0));
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

// Rescale along rows: each sample b's rows pruned on the row path, then scaled per (b, channel) plane (summed over
// the O rows), or per b in row mode, by sum|g| / (sum|kept| + eps).
inline void rescale_rows4(const float* gp, float* op, const View& v, const View& vo, int n, double eps, bool row) {
  at::parallel_for(0, v.B, 1, [&](int64_t lo, int64_t hi) {
    const int64_t per_b = row ? 1 : v.C;
    std::vector<float> full(per_b), kept(per_b);
    for (int64_t b = lo; b < hi; ++b) {
      std::fill(full.begin(), full.end(), 0.0f);
      std::fill(kept.begin(), kept.end(), 0.0f);
      for (int64_t o = 0; o < v.O; ++o) {
        const float* x = gp + v.at(b, o, 0, 0);
        float* y = op + vo.at(b, o, 0, 0);
        prune_row4(x, y, v.C, n);
        if (row) {
          full[0] += abs_sum_row4(x, v.C);
          kept[0] += abs_sum_row4(y, v.C);
        } else {
          for (int64_t c = 0; c < v.C; ++c) {
            full[c] += std::abs(x[c]);
            kept[c] += std::abs(y[c]);
          }
        }
      }
      for (int64_t c = 0; c < per_b; ++c) full[c] = full[c] / (kept[c] + static_cast<float>(eps));
      for (int64_t o = 0; o < v.O; ++o) {
        float* y = op + vo.at(b, o, 0, 0);
        for (int64_t c = 0; c < v.C; ++c) y[c] = y[c] * full[row ? 0 : c];
      }
    }
  });
}

// Calls fn(b, o, b * O + o) for every row (b, o) of a (B, O, C, I) view, in parallel.
template <typename F>
inline void for_rows(const View& v, F&& fn) {
  at::parallel_for(0, v.B * v.O, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t bo = lo; bo < hi; ++bo) fn(bo / v.O, bo % v.O, bo);
  });
}
#endif

// The row path takes float32 n:4 (m == 4) along rows with contiguous channels and nothing after them (I == 1): a
// Linear weight's mask, a Linear gradient's prune. The tile path measured 2.4-3.5 ns per element there.
template <typename scalar_t, int MT>
constexpr bool kRow4 =
#ifdef __AVX2__
    std::is_same<scalar_t, float>::value && MT == 4;
#else
    false;
#endif

inline bool rows_of(const View& v) { return v.I == 1 && v.sC == 1; }

// x[j][w] = p[lane w's entry j] as acc_t (zero beyond count); contiguous loads when the lanes are adjacent, and
// for W whole groups side by side in a row (a Linear gradient) loads and shuffles: the compiler vectorizes the
// transpose when MT is a constant (with a run-time stride it loads lane by lane).
template <typename acc_t, int MT, typename scalar_t>
inline void gather(const scalar_t* p, const Lanes& l, int m_arg, int64_t sC, acc_t (*x)[W]) {
  const int m = MT ? MT : m_arg;
  if (l.whole_row<MT>(sC)) {
    const scalar_t* q = p + l.off;
#ifdef __AVX__
    if constexpr (MT == 4 && std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value) {
      transpose_8x4_in(q, x);
      return;
    }
#endif
    for (int j = 0; j < m; ++j)
      for (int w = 0; w < W; ++w) x[j][w] = static_cast<acc_t>(q[w * MT + j]);
    return;
  }
  for (int j = 0; j < m; ++j) {
    const scalar_t* q = p + l.off + j * sC;
    if (l.count == W && l.step == 1) {
      for (int w = 0; w < W; ++w) x[j][w] = static_cast<acc_t>(q[w]);
    } else {
      for (int w = 0; w < l.count; ++w) x[j][w] = static_cast<acc_t>(q[w * l.step]);
      for (int w = l.count; w < W; ++w) x[j][w] = acc_t(0);
    }
  }
}

template <int MT, typename out_t, typename val_t>
inline void scatter(out_t* p, const Lanes& l, int m_arg, int64_t sC, const val_t (*y)[W]) {
  const int m = MT ? MT : m_arg;
  if (l.whole_row<MT>(sC)) {
    out_t* q = p + l.off;
#ifdef __AVX__
    if constexpr (MT == 4 && std::is_same<out_t, float>::value && std::is_same<val_t, float>::value) {
      transpose_4x8_out(y, q);
      return;
    }
#endif
    for (int j = 0; j < m; ++j)
      for (int w = 0; w < W; ++w) q[w * MT + j] = static_cast<out_t>(y[j][w]);
    return;
  }
  for (int j = 0; j < m; ++j) {
    out_t* q = p + l.off + j * sC;
    if (l.count == W && l.step == 1) {
      for (int w = 0; w < W; ++w) q[w] = static_cast<out_t>(y[j][w]);
    } else {
      for (int w = 0; w < l.count; ++w) q[w * l.step] = static_cast<out_t>(y[j][w]);
    }
  }
}

// Calls fn(tile, b) for the groups of the rows [lo, hi) of b * O + o of a (B, O, C, I) view: lanes along
// I when I >= W (a conv gradient: neighbouring positions of one group), else along the groups of a row at
// each position i (a Linear gradient, a conv weight's 3x3 taps). A tile never spans two groups (lanes along
// I) or two positions, so its lanes are evenly spaced.
template <typename F>
void for_tiles(const View& v, int m, int64_t lo, int64_t hi, F&& fn) {
  const int64_t G = v.C / m;
  for (int64_t bo = lo; bo < hi; ++bo) {
    const int64_t b = bo / v.O, o = bo % v.O;
    if (v.I >= W) {
      for (int64_t gi = 0; gi < G; ++gi)
        for (int64_t i = 0; i < v.I; i += W) {
          const int64_t flat = bo * v.I + i;
          fn(Lanes{static_cast<int>(std::min<int64_t>(W, v.I - i)), v.at(b, o, gi * m, i), v.sI,
                   flat * v.C + gi * m, v.C, flat * G + gi, G, gi * m, 0}, b);
        }
    } else {
      for (int64_t i = 0; i < v.I; ++i) {
        const int64_t flat = bo * v.I + i;
        for (int64_t gi = 0; gi < G; gi += W)
          fn(Lanes{static_cast<int>(std::min<int64_t>(W, G - gi)), v.at(b, o, gi * m, i), m * v.sC,
                   flat * v.C + gi * m, m, flat * G + gi, 1, gi * m, m}, b);
      }
    }
  }
}

template <typename scalar_t, int MT>
void prune_impl(const torch::Tensor& g4, torch::Tensor& o4, int n, int m_arg, int method, uint64_t rnd,
                double eps, bool row) {
  const int m = MT ? MT : m_arg;
  using acc_t = acc_type<scalar_t>;
  const View v(g4);
  const View vo(o4);
  TORCH_CHECK(vo.B == v.B && vo.O == v.O && vo.C == v.C && vo.I == v.I, "nm_prune: out's shape differs from g's");
  TORCH_CHECK(v.sB == vo.sB && v.sO == vo.sO && v.sC == vo.sC && v.sI == vo.sI, "nm_prune: out's strides differ");
  const scalar_t* gp = g4.data_ptr<scalar_t>();
  scalar_t* op = o4.data_ptr<scalar_t>();
#ifdef __AVX2__
  if constexpr (kRow4<scalar_t, MT>) {
    if (rows_of(v) && (method == MAGNITUDE || method == RANDOM || method == RANDOM_UNBIASED)) {
      const float unbiased_f = static_cast<float>(static_cast<double>(m) / n);
      for_rows(v, [&](int64_t b, int64_t o, int64_t bo) {  // entry (b, o, c) is number bo * C + c (I == 1)
        prune_row4(gp + v.at(b, o, 0, 0), op + vo.at(b, o, 0, 0), v.C, n, method, rnd, static_cast<uint64_t>(bo * v.C),
                   unbiased_f);
      });
      return;
    }
    if (rows_of(v) && method == RESCALE) return rescale_rows4(gp, op, v, vo, n, eps, row);
  }
#endif
  const acc_t unbiased = static_cast<acc_t>(static_cast<double>(m) / n);  // torch's tensor * Python float
  const bool rescale = method == RESCALE;
  // rescale: |g| and |kept| summed per (b, channel) plane over (O, I), or per b in row mode. Channel
  // c = g * m + j sums at slot j * G + g, so the lanes of a tile along a row (channels c0 + w * m + j)
  // add to adjacent slots: one vector add per j instead of a scalar add per entry.
  const int64_t per_b = row ? 1 : v.C, G = v.C / m;
  auto slot = [&](int64_t c) { return (c % m) * G + c / m; };
  std::vector<acc_t> full(rescale ? v.B * per_b : 0), kept(rescale ? v.B * per_b : 0);

  auto tile = [&](const Lanes& l, int64_t b) {
    acc_t x[MAXM][W], y[MAXM][W];
    gather<acc_t, MT>(gp, l, m, v.sC, x);
    if (method == MVUE) {
      acc_t u[W];
      for (int w = 0; w < W; ++w) {
        const acc_t d = static_cast<acc_t>(draw(rnd, static_cast<uint64_t>(l.grp + w * l.grp_step)));
        u[w] = w < l.count ? d : acc_t(0);
      }
      if (n > 2) mvue_tile<acc_t, MT, true>(x, m, n, u, y);
      else mvue_tile<acc_t, MT, false>(x, m, n, u, y);
    } else {
      int keep[MAXM][W];
      if (method == RANDOM || method == RANDOM_UNBIASED) {
        float key[MAXM][W];
        for (int j = 0; j < m; ++j)
          for (int w = 0; w < W; ++w) {
            const float d = draw(rnd, static_cast<uint64_t>(l.key + w * l.key_step + j));
            key[j][w] = w < l.count ? d : 0.0f;
          }
        for (int j = 0; j < m; ++j)
          for (int w = 0; w < W; ++w) {
            const float k = key[j][w];
            key[j][w] = finite(x[j][w]) ? k : 2.0f;  // above any draw
          }
        top_n<float, MT>(key, m, n, keep);
      } else {
        acc_t key[MAXM][W];
        for (int j = 0; j < m; ++j)
          for (int w = 0; w < W; ++w) key[j][w] = magnitude_key<acc_t>(x[j][w]);
        top_n<acc_t, MT>(key, m, n, keep);
      }
      if (method == RANDOM_UNBIASED) {  // in g's dtype, as torch multiplies a tensor by a Python float
        for (int j = 0; j < m; ++j)
          for (int w = 0; w < W; ++w) {
            const acc_t k = static_cast<acc_t>(static_cast<scalar_t>(x[j][w] * unbiased));
            y[j][w] = keep[j][w] ? k : acc_t(0);
          }
      } else {
        for (int j = 0; j < m; ++j)
          for (int w = 0; w < W; ++w) {
            const acc_t k = x[j][w];
            y[j][w] = keep[j][w] ? k : acc_t(0);
          }
      }
    }
    scatter<MT>(op, l, m, v.sC, y);
    if (rescale) {
      for (int j = 0; j < m; ++j) {
        // lanes along I share their channels; lanes along a row hold channel c0 + w * m + j
        if (l.c_step == 0 || row) {
          acc_t f = 0, k = 0;
          for (int w = 0; w < l.count; ++w) {
            f += std::abs(x[j][w]);
            k += std::abs(static_cast<acc_t>(static_cast<scalar_t>(y[j][w])));
          }
          const int64_t s = row ? 0 : slot(l.c0 + j);
          full[b * per_b + s] += f;
          kept[b * per_b + s] += k;
        } else {
          acc_t* f = full.data() + b * per_b + slot(l.c0 + j);
          acc_t* k = kept.data() + b * per_b + slot(l.c0 + j);
          for (int w = 0; w < l.count; ++w) {
            f[w] += std::abs(x[j][w]);
            k[w] += std::abs(static_cast<acc_t>(static_cast<scalar_t>(y[j][w])));
          }
        }
      }
    }
  };
  if (!rescale) {
    at::parallel_for(0, v.B * v.O, 1, [&](int64_t lo, int64_t hi) { for_tiles(v, m, lo, hi, tile); });
    return;
  }
  // rescale: rows of one b stay in one task (their sums), then out *= full / (kept + eps) per plane.
  at::parallel_for(0, v.B, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      for_tiles(v, m, b * v.O, (b + 1) * v.O, tile);
      std::vector<acc_t> sc(per_b);
      for (int64_t c = 0; c < per_b; ++c) {
        const int64_t s = b * per_b + (row ? 0 : slot(c));
        sc[c] = full[s] / (kept[s] + static_cast<acc_t>(eps));
      }
      auto scale = [](scalar_t* y, int64_t len, int64_t stride, acc_t s) {
        if (stride == 1) {
          for (int64_t i = 0; i < len; ++i) y[i] = static_cast<scalar_t>(static_cast<acc_t>(y[i]) * s);
        } else {
          for (int64_t i = 0; i < len; ++i) y[i * stride] = static_cast<scalar_t>(static_cast<acc_t>(y[i * stride]) * s);
        }
      };
      for (int64_t o = 0; o < v.O; ++o) {
        if (row) {  // one scale for the whole row (I == 1 here): along the channels
          scale(op + v.at(b, o, 0, 0), v.C, v.sC, sc[0]);
        } else if (v.I == 1) {  // a Linear gradient: a scale per channel along the row
          scalar_t* y = op + v.at(b, o, 0, 0);
          const acc_t* f = sc.data();
          if (v.sC == 1) {
            for (int64_t c = 0; c < v.C; ++c) y[c] = static_cast<scalar_t>(static_cast<acc_t>(y[c]) * f[c]);
          } else {
            for (int64_t c = 0; c < v.C; ++c) y[c * v.sC] = static_cast<scalar_t>(static_cast<acc_t>(y[c * v.sC]) * f[c]);
          }
        } else {
          for (int64_t c = 0; c < v.C; ++c) scale(op + v.at(b, o, c, 0), v.I, v.sI, sc[c]);
        }
      }
    }
  });
}

template <typename scalar_t, int MT>
void mask_impl(const torch::Tensor& w4, torch::Tensor& m4, int n, int m_arg) {
  const int m = MT ? MT : m_arg;
  using acc_t = acc_type<scalar_t>;
  const View v(w4), vm(m4);
  TORCH_CHECK(v.sB == vm.sB && v.sO == vm.sO && v.sC == vm.sC && v.sI == vm.sI, "nm_mask: the mask's strides differ");
  const scalar_t* wp = w4.data_ptr<scalar_t>();
  bool* out = m4.data_ptr<bool>();
#ifdef __AVX2__
  if constexpr (kRow4<scalar_t, MT>) {
    if (rows_of(v)) {
      for_rows(v, [&](int64_t b, int64_t o, int64_t) { mask_row4(wp + v.at(b, o, 0, 0), out + vm.at(b, o, 0, 0), v.C, n); });
      return;
    }
  }
#endif
  at::parallel_for(0, v.B * v.O, 1, [&](int64_t lo, int64_t hi) {
    for_tiles(v, m, lo, hi, [&](const Lanes& l, int64_t) {
      acc_t key[MAXM][W];
      int keep[MAXM][W];
      gather<acc_t, MT>(wp, l, m, v.sC, key);
      for (int j = 0; j < m; ++j)
        for (int w = 0; w < W; ++w) key[j][w] = magnitude_key<acc_t>(key[j][w]);
      top_n<acc_t, MT>(key, m, n, keep);
      scatter<MT>(out, l, m, v.sC, keep);
    });
  });
}

// fn(std::integral_constant<int, M>) with M = m for the common 2:4 and 4:8 groups (the loops over a group
// then unroll), M = 0 (m at run time) otherwise.
template <typename F>
void with_m(int64_t m, F&& fn) {
  if (m == 4) fn(std::integral_constant<int, 4>());
  else if (m == 8) fn(std::integral_constant<int, 8>());
  else fn(std::integral_constant<int, 0>());
}

void check_args(const torch::Tensor& t, int64_t n, int64_t m) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4, "nm_prune: expects a 4-D (B, O, C, I) CPU view");
  TORCH_CHECK(m >= 1 && m <= MAXM && n >= 1 && n <= m, "nm_prune: needs 1 <= n <= m <= ", MAXM);
  TORCH_CHECK(t.size(2) % m == 0, "nm_prune: the channel count is not a multiple of m");
}

}  // namespace

// g4, out4: (B, O, C, I) views of g and of a tensor like it; key: the random methods' key (draw).
void prune_grad(torch::Tensor g4, torch::Tensor out4, int64_t n, int64_t m, int64_t method, int64_t key,
                double eps, bool row) {
  check_args(g4, n, m);
  TORCH_CHECK(out4.scalar_type() == g4.scalar_type(), "nm_prune: out's dtype differs from g's");
  TORCH_CHECK(method >= MAGNITUDE && method <= MVUE, "nm_prune: unknown method code ", method);
  const uint64_t r = static_cast<uint64_t>(key);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g4.scalar_type(), "nm_prune", [&] {
    with_m(m, [&](auto mt) {
      prune_impl<scalar_t, decltype(mt)::value>(g4, out4, static_cast<int>(n), static_cast<int>(m), static_cast<int>(method), r,
                                                 eps, row);
    });
  });
}

// w4: (B, O, C, I) view of a weight; mask4: a bool tensor's view of the same shape.
void nm_mask(torch::Tensor w4, torch::Tensor mask4, int64_t n, int64_t m) {
  check_args(w4, n, m);
  TORCH_CHECK(mask4.scalar_type() == torch::kBool && mask4.sizes() == w4.sizes(), "nm_mask: bad mask view");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w4.scalar_type(), "nm_mask", [&] {
    with_m(m, [&](auto mt) { mask_impl<scalar_t, decltype(mt)::value>(w4, mask4, static_cast<int>(n), static_cast<int>(m)); });
  });
}

// SR-STE's two elementwise passes over a weight, each one read and one write (the torch expressions
// they replace take 3-4 passes through bool-to-float promotion): the masked weight w * mask, and the
// backward grad + decay * (mask ? 0 : w). Same arithmetic as the torch expressions, in g's dtype.
torch::Tensor masked_weight(torch::Tensor w, torch::Tensor mask) {
  TORCH_CHECK(w.is_contiguous() && mask.is_contiguous() && mask.scalar_type() == torch::kBool &&
              w.sizes() == mask.sizes() && w.device().is_cpu(), "masked_weight: contiguous CPU w and bool mask");
  auto out = torch::empty_like(w);
  const uint8_t* mk = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());  // bytes: a bool select stayed a branch
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "masked_weight", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, w.numel(), 1 << 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i)  // w * 1 or w * 0, as torch multiplies (so inf * 0 is NaN there too)
        op[i] = static_cast<scalar_t>(static_cast<acc_t>(wp[i]) * static_cast<acc_t>(mk[i]));
    });
  });
  return out;
}

torch::Tensor srste_grad(torch::Tensor grad, torch::Tensor w, torch::Tensor mask, double decay) {
  TORCH_CHECK(grad.is_contiguous() && w.is_contiguous() && mask.is_contiguous() && mask.scalar_type() == torch::kBool &&
              grad.sizes() == w.sizes() && w.sizes() == mask.sizes() && grad.scalar_type() == w.scalar_type() &&
              w.device().is_cpu(), "srste_grad: contiguous CPU grad, w of one dtype and a bool mask");
  auto out = torch::empty_like(grad);
  const uint8_t* mk = reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>());  // bytes: a bool select stayed a branch
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "srste_grad", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t d = static_cast<acc_t>(decay);
    at::parallel_for(0, w.numel(), 1 << 16, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        // torch: grad + decay * w.masked_fill(mask, 0), each op rounded to the dtype
        const scalar_t wl = wp[i];  // loaded in every lane: a conditional load keeps the loop scalar
        const scalar_t wv = mk[i] ? scalar_t(0) : wl;
        const scalar_t dw = static_cast<scalar_t>(d * static_cast<acc_t>(wv));
        op[i] = static_cast<scalar_t>(static_cast<acc_t>(gp[i]) + static_cast<acc_t>(dw));
      }
    });
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("masked_weight", &masked_weight, "w * mask (bool) in one pass");
  mod.def("srste_grad", &srste_grad, "SR-STE's weight gradient grad + decay * (mask ? 0 : w) in one pass");
  mod.def("prune_grad", &prune_grad, "SDGP's N:M gradient pruning of a (B, O, C, I) view, in one pass");
  mod.def("nm_mask", &nm_mask, "magnitude N:M mask of a (B, O, C, I) view along C");
  mod.def("row4_path", []() { return kRow4<float, 4>; }, "whether float32 n:4 rows take the AVX2 row path");
  mod.attr("MAXM") = MAXM;
}
