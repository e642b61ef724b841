// The tile path of nm_prune.cpp: any m, dtype and layout. A tile is W groups side by side, gathered into [m][W]
// lane arrays, decided lane by lane (the compiler vectorizes the loops) and scattered back.

#pragma once

#include "nm_prune_common.h"

namespace {

// Branch-free tests (std::isnan / std::isfinite keep the loops that use them from vectorizing).
template <typename acc_t>
inline bool finite(acc_t x) { return std::abs(x) <= std::numeric_limits<acc_t>::max(); }

template <typename acc_t>
inline acc_t magnitude_key(acc_t x) {
  const acc_t a = std::abs(x);
  return a == a ? a : std::numeric_limits<acc_t>::infinity();  // NaN ranks as +inf
}

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
  // Only a and capped live through the rounds (16 vector registers in all): fin and q are recomputed where used.
  V a[MA];
  M capped[MA];
  M nz = M{};
  for (int j = 0; j < m; ++j) {
    const V v = L::load(x[j]);
    const V av = (V)((M)v & no_sign);  // |x| as std::abs: the sign bit cleared (NaN stays NaN, fails the test below)
    a[j] = av <= L::splat(std::numeric_limits<acc_t>::max()) ? av : zero;
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
  auto q_of = [&](int j) { return (capped[j] | few) ? zero : a[j] * ratio; };
  M last = M{} - 1;
  for (int j = 0; j < m; ++j) last = q_of(j) > zero ? M{} + j : last;
  V cum = zero, prev = L::ceil(-u);
  for (int j = 0; j < m; ++j) {
    const V q = q_of(j);
    cum += q;
    const V end = cum < r ? cum : r;  // min(cum, r) as torch.minimum (no NaN here)
    const V now = L::ceil((last <= j ? r : end) - u);
    const M drawn = (now > prev) & (q > zero);
    prev = now;
    const V g = L::load(x[j]);
    const V sign = g > zero ? one : (g < zero ? -one : zero);
    const M fin = (V)((M)g & no_sign) <= L::splat(std::numeric_limits<acc_t>::max());
    const M keep = capped[j] | few | ~fin;
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

}  // namespace
