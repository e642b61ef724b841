// The AVX2 plane path of nm_prune.cpp: float32 n:4 across channels that lie a plane apart (an NCHW conv gradient:
// channel stride H*W, positions contiguous), each method with the tile path's values. A vector holds 8 positions
// of one channel, so a group's 4 channels are 4 plain loads: no gather, no transpose. The tile path measured
// 2.2-2.8 ns per element on ResNet-18's conv gradients (AMD EPYC Zen 5).

#pragma once

#include "nm_prune_rows.h"

namespace {

#ifdef __AVX2__
// keep[j] (-1 / 0 lanes) for the 4 keys of 8 groups side by side: rank j = the earlier entries with a key >= j's
// plus the later ones with a key > j's (keys are never NaN here), kept when rank < n.
inline void planes4_keep(const __m256 (&k)[4], int n, __m256i (&keep)[4]) {
  __m256i beaten[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
  const __m256i ones = _mm256_set1_epi32(-1);
  for (int a = 0; a < 4; ++a)
    for (int b = a + 1; b < 4; ++b) {
      const __m256i ge = _mm256_castps_si256(_mm256_cmp_ps(k[a], k[b], _CMP_GE_OQ));  // a beats b: -1
      beaten[b] = _mm256_add_epi32(beaten[b], ge);
      beaten[a] = _mm256_add_epi32(beaten[a], _mm256_xor_si256(ge, ones));  // else b beats a
    }
  for (int j = 0; j < 4; ++j) keep[j] = _mm256_cmpgt_epi32(beaten[j], _mm256_set1_epi32(-n));
}

// 8 positions of a group's 4 channels (g[j * sC]) pruned into out: magnitude, random or random-unbiased, as
// row4_pruned decides them. e: the entry number of channel 0 at the first position (positions C apart).
inline void planes4_pruned(const float* g, float* out, int64_t sC, int64_t osC, int64_t C, int n, int method,
                           uint64_t rnd, uint64_t e, float unbiased) {
  __m256 x[4], k[4];
  for (int j = 0; j < 4; ++j) {
    x[j] = _mm256_loadu_ps(g + j * sC);
    k[j] = method == MAGNITUDE ? magnitude_key8(x[j]) : random_key8(x[j], draws8(rnd, e + j, static_cast<uint64_t>(C)));
  }
  __m256i keep[4];
  planes4_keep(k, n, keep);
  for (int j = 0; j < 4; ++j) {
    const __m256 y = method == RANDOM_UNBIASED ? _mm256_mul_ps(x[j], _mm256_set1_ps(unbiased)) : x[j];
    _mm256_storeu_ps(out + j * osC, _mm256_and_ps(y, _mm256_castsi256_ps(keep[j])));
  }
}

// The plane path takes (B, O, C, I) views with contiguous positions (sI == 1) in whole vectors (I % 8 == 0).
inline bool planes_of(const View& v) { return v.sI == 1 && v.I >= W && v.I % W == 0 && v.C % 4 == 0; }

// Calls fn(b, o, gi, (b * O + o)) for every group gi of every (b, o), in parallel.
template <typename F>
inline void for_plane_groups(const View& v, F&& fn) {
  const int64_t G = v.C / 4;
  at::parallel_for(0, v.B * v.O * G, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t bo = t / G;
      fn(bo / v.O, bo % v.O, t % G, bo);
    }
  });
}

// magnitude, random, random-unbiased on the plane path
inline void prune_planes4(const float* gp, float* op, const View& v, const View& vo, int n, int method, uint64_t rnd,
                          float unbiased) {
  for_plane_groups(v, [&](int64_t b, int64_t o, int64_t gi, int64_t bo) {
    const float* g = gp + v.at(b, o, 4 * gi, 0);
    float* y = op + vo.at(b, o, 4 * gi, 0);
    for (int64_t i = 0; i < v.I; i += W)  // entry (b, o, c, i) is number (bo * I + i) * C + c
      planes4_pruned(g + i, y + i, v.sC, vo.sC, v.C, n, method, rnd,
                     static_cast<uint64_t>((bo * v.I + i) * v.C + 4 * gi), unbiased);
  });
}

// rescale on the plane path (O == 1: a plane is one channel's I positions of sample b): prune by magnitude, then
// scale each of the group's 4 planes by sum|g| / (sum|kept| + eps), sums in 8 partial sums.
inline void rescale_planes4(const float* gp, float* op, const View& v, const View& vo, int n, double eps) {
  for_plane_groups(v, [&](int64_t b, int64_t o, int64_t gi, int64_t) {
    const float* g = gp + v.at(b, o, 4 * gi, 0);
    float* y = op + vo.at(b, o, 4 * gi, 0);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 full[4], kept[4];
    for (int j = 0; j < 4; ++j) full[j] = kept[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < v.I; i += W) {
      planes4_pruned(g + i, y + i, v.sC, vo.sC, v.C, n, MAGNITUDE, 0, 0, 1.0f);
      for (int j = 0; j < 4; ++j) {
        full[j] = _mm256_add_ps(full[j], _mm256_andnot_ps(sign, _mm256_loadu_ps(g + j * v.sC + i)));
        kept[j] = _mm256_add_ps(kept[j], _mm256_andnot_ps(sign, _mm256_loadu_ps(y + j * vo.sC + i)));
      }
    }
    for (int j = 0; j < 4; ++j) {
      const __m256 s = _mm256_set1_ps(sum8(full[j]) / (sum8(kept[j]) + static_cast<float>(eps)));
      float* yj = y + j * vo.sC;
      for (int64_t i = 0; i < v.I; i += W) _mm256_storeu_ps(yj + i, _mm256_mul_ps(_mm256_loadu_ps(yj + i), s));
    }
  });
}

// mvue of K * 8 positions of a group from position i on: K tiles in flight (mvue_tiles4); group (b, o, gi, i) is
// number (bo * I + i) * G + gi, positions G apart.
template <int K>
inline void mvue_planes4_block(const float* g, float* y, int64_t sC, int64_t osC, int64_t i, int n, uint64_t rnd,
                               uint64_t grp, uint64_t G) {
  alignas(32) float x[K][4][W], out[K][4][W], u[K][W];
  for (int k = 0; k < K; ++k) {
    for (int j = 0; j < 4; ++j) _mm256_store_ps(x[k][j], _mm256_loadu_ps(g + j * sC + i + k * W));
    _mm256_store_ps(u[k], draws8(rnd, grp + static_cast<uint64_t>(i + k * W) * G, G));
  }
  mvue_tiles4<K>(x, n, u, out);
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(y + j * osC + i + k * W, _mm256_load_ps(out[k][j]));
}

inline void mvue_planes4(const float* gp, float* op, const View& v, const View& vo, int n, uint64_t rnd) {
  const int64_t G = v.C / 4;
  for_plane_groups(v, [&](int64_t b, int64_t o, int64_t gi, int64_t bo) {
    const float* g = gp + v.at(b, o, 4 * gi, 0);
    float* y = op + vo.at(b, o, 4 * gi, 0);
    const uint64_t grp = static_cast<uint64_t>(bo * v.I * G + gi), step = static_cast<uint64_t>(G);
    in_tile_blocks(v.I, [&](auto k, int64_t i) {  // I is whole tiles (planes_of)
      mvue_planes4_block<decltype(k)::value>(g, y, v.sC, vo.sC, i, n, rnd, grp, step);
    });
  });
}
#endif

}  // namespace
