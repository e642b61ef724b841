// Exact transposable N:M masks: per m x m tile of |W|, the 0/1 mask with exactly n ones in every
// row and every column that keeps the largest sum (a maximum-weight bipartite b-matching).
//
// Built on first use by nmsparse.kernels.transposable (kernels/_extensions.py) into the extension
// that provides transposable_exact. Method, per tile:
//   min-cost flow rows -> columns, edge (i, j) of capacity 1 and cost -|w_ij|, solved by successive
//   shortest paths with potentials (the primal-dual method; the LP's optimum is integral, so the
//   result is the exact optimum). Start (Solver::start): column prices theta from two or three
//   rounds of per-column and per-row thresholds, then every row keeps its n largest of
//   |w_ij| - theta_j; with column potentials -theta and row potentials at each row's n-th largest,
//   every reduced cost is >= 0, so the mask is optimal for the column counts it happens to have
//   (any theta would do; good ones leave few columns over-full: about 1 unit per 8x8 Gaussian tile
//   against 4.4 with theta = 0). Then, while a column holds more than n, move one unit from an
//   over-full column to the nearest under-full one along a shortest residual path (Solver::augment:
//   Dijkstra on reduced costs over the columns; column -> row cancels a kept entry, row -> column
//   keeps a new one) and update the potentials; each move keeps the mask optimal for its current
//   column counts, and the last one makes every count n.
// Arithmetic is double (float32 magnitudes are exact in it); round-off that would make a reduced
// cost negative is clamped to 0, so Dijkstra stays valid on ties. Every choice breaks ties by the
// lowest index, so the mask is a deterministic function of the tile, whatever the thread count.
// Non-finite magnitudes (NaN, inf) count as larger than the tile's finite sum, as in the torch path.
// Tiles are independent: torch.get_num_threads() threads (at::parallel_for) share them out.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#ifdef __AVX__
#include <immintrin.h>
#endif
#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>

namespace {

constexpr int MAXM = 64;  // rows and columns of a tile are held as 64-bit sets
using u64 = uint64_t;
constexpr double INF = std::numeric_limits<double>::infinity();
constexpr float FINF = std::numeric_limits<float>::infinity();
constexpr float ROUNDS_MAX = 1e30f;  // price rounds run in float: skipped for tiles beyond this

typedef double v4d __attribute__((vector_size(32)));
typedef int64_t v4l __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
template <typename V, typename S>
inline V vload(const S* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
template <typename V, typename S>
inline void vstore(S* p, V v) { std::memcpy(p, &v, sizeof v); }

inline int lowest(u64 s) { return __builtin_ctzll(s); }

// Order statistics across lines, many positions at once. src holds `lines` lines of `width`
// values (stride P); line l is shifted by -shift[l]. For every position p, the lines are ranked by
// src[l][p] - shift[l], descending, ties to the lower line; each value's rank goes to
// use(p0, l, value, rank), a vector of L positions from p0 at a time.
template <typename V, typename I, int L, typename S, typename F>
inline void rank_lines(const S* src, const S* shift, int lines, int width, int P, S* buf, F use) {
  for (int l = 0; l < lines; ++l)
    for (int p0 = 0; p0 < width; p0 += L) vstore(buf + l * P + p0, vload<V>(src + l * P + p0) - shift[l]);
  for (int p0 = 0; p0 < width; p0 += L) {
    for (int l = 0; l < lines; ++l) {
      const V vl = vload<V>(buf + l * P + p0);
      I cnt = I{};
      for (int k = 0; k < l; ++k) cnt -= vload<V>(buf + k * P + p0) >= vl;  // a true lane is -1
      for (int k = l + 1; k < lines; ++k) cnt -= vload<V>(buf + k * P + p0) > vl;
      use(p0, l, vl, cnt);
    }
  }
}

inline u64 lane_bits(v4l mask) {
#ifdef __AVX__
  return u64(_mm256_movemask_pd(reinterpret_cast<__m256d>(mask)));
#else
  return u64(mask[0] & 1) | u64(mask[1] & 1) << 1 | u64(mask[2] & 1) << 2 | u64(mask[3] & 1) << 3;
#endif
}

// MT: the tile size when known at compile time (loops then unroll), 0 for any m up to MAXM.
template <int MT>
struct Solver {
  int m_, n, rounds, P_;  // P: m rounded up to 8, the stride of every m x m array
  u64 all;              // the bits of the m columns
  // a: |w| of the tile by rows, at: by columns (double); af, aft: the same in float.
  alignas(32) double a[MAXM * MAXM], at[MAXM * MAXM], bufd[MAXM * MAXM];
  alignas(32) float af[MAXM * MAXM], aft[MAXM * MAXM], buff[MAXM * MAXM];
  u64 rowsel[MAXM], colsel[MAXM];  // kept columns of each row, kept rows of each column
  // Potentials (phic: columns, phir: rows), tentative (dc, dr) and settled (fc) distances,
  // predecessors (predc: the row a column was reached from, predr: the column a row was).
  alignas(32) double phic[MAXM], phir[MAXM], dc[MAXM], fc[MAXM], dr[MAXM], thetad[MAXM];
  alignas(32) int64_t predc[MAXM];
  alignas(32) float theta[MAXM], rho[MAXM];
  int predr[MAXM], load[MAXM];
  bool price;  // whether this tile runs the price rounds

  Solver(int m, int n_, int rounds_) : m_(m), n(n_), rounds(rounds_), P_((m + 7) & ~7) {
    all = m == 64 ? ~u64(0) : (u64(1) << m) - 1;
    std::fill(std::begin(a), std::end(a), 0.0);
    std::fill(std::begin(at), std::end(at), 0.0);
    std::fill(std::begin(af), std::end(af), 0.f);
    std::fill(std::begin(aft), std::end(aft), 0.f);
    for (int k = 0; k < MAXM; ++k) { phic[k] = phir[k] = thetad[k] = 0.0; theta[k] = rho[k] = 0.f; }
  }

  template <typename T>
  void load_tile(const T* w, int64_t ld) {
    const int m = MT ? MT : m_, P = MT ? ((MT + 7) & ~7) : P_;
    bool finite = true;
    double top = 0.0;
    for (int i = 0; i < m; ++i) {
      const T* wi = w + i * ld;
      double* ai = a + i * P;
      for (int j = 0; j < m; ++j) {
        const double v = std::fabs(static_cast<double>(wi[j]));
        ai[j] = v;
        finite &= v <= DBL_MAX;  // false for inf and NaN
        top = v > top ? v : top;
      }
    }
    if (!finite) {  // above any finite sum of the tile (the rule of patterns.transposable._tile_weights)
      top = 0.0;
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < m; ++j) if (a[i * P + j] <= DBL_MAX) top = std::max(top, a[i * P + j]);
      const double big = std::min(top * 4.0 * m * m + 1.0, DBL_MAX / (4.0 * m * m));
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < m; ++j) if (!(a[i * P + j] <= DBL_MAX)) a[i * P + j] = big;
      top = big;
    }
    price = rounds > 0 && top < ROUNDS_MAX;
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < m; ++j) {
        const double v = a[i * P + j];
        at[j * P + i] = v;
        if (price) af[i * P + j] = aft[j * P + i] = static_cast<float>(v);
      }
    }
  }

  // A dual-feasible start that leaves few columns over-full. Column prices theta come from a few
  // alternating rounds of thresholds (each column's, then each row's, halfway between the n-th and
  // (n+1)-th largest of the price-adjusted line), in float: any theta is valid, these are only
  // good. Then every row keeps its n largest of a - theta (double; ties to the lower column).
  // With potentials -theta (columns) and each row's n-th largest of a - theta (rows), every
  // residual reduced cost is >= 0.
  void start() {
    const int m = MT ? MT : m_, P = MT ? ((MT + 7) & ~7) : P_;
    for (int k = 0; k < m; ++k) { theta[k] = 0.f; rho[k] = 0.f; }
    const int nn = n;
    for (int r = 0; price && r < rounds; ++r) {
      if (r > 0) {  // rho[i]: row i's threshold of a_ij - theta_j (lines: columns; positions: rows)
        for (int p0 = 0; p0 < m; p0 += 8) vstore(rho + p0, v8f{});
        rank_lines<v8f, v8i, 8>(aft, theta, m, m, P, buff, [&](int p0, int, v8f v, v8i c) {
          vstore(rho + p0, vload<v8f>(rho + p0) + (((c == nn - 1) | (c == nn)) ? 0.5f * v : v8f{}));
        });
      }
      for (int p0 = 0; p0 < m; p0 += 8) vstore(theta + p0, v8f{});
      rank_lines<v8f, v8i, 8>(af, rho, m, m, P, buff, [&](int p0, int, v8f v, v8i c) {
        vstore(theta + p0, vload<v8f>(theta + p0) + (((c == nn - 1) | (c == nn)) ? 0.5f * v : v8f{}));
      });
    }
    for (int j = 0; j < m; ++j) { thetad[j] = theta[j]; phic[j] = -thetad[j]; phir[j] = 0.0; }
    // Row i keeps its n best columns of a_ij - theta_j (lines: columns; positions: rows).
    rank_lines<v4d, v4l, 4>(at, thetad, m, m, P, bufd, [&](int p0, int j, v4d v, v4l c) {
      colsel[j] = (p0 ? colsel[j] : 0) | lane_bits(c < nn) << p0;
      vstore(phir + p0, vload<v4d>(phir + p0) + ((c == nn - 1) ? v : v4d{}));  // the smallest kept
    });
    for (int i = 0; i < m; ++i) rowsel[i] = 0;
    for (int j = 0; j < m; ++j) {
      colsel[j] &= all;
      for (u64 q = colsel[j]; q; q &= q - 1) rowsel[lowest(q)] |= u64(1) << j;
    }
  }

  // Row i reached at distance di: offer its not-kept columns (keep (i, k): cost -a_ik), 4 at a time.
  inline void relax_row(int i, double di, u64 blocked) {
    const int m = MT ? MT : m_, P = MT ? ((MT + 7) & ~7) : P_;
    const double* ai = a + i * P;
    const v4l lane = {0, 1, 2, 3};
    for (int k0 = 0; k0 < m; k0 += 4) {
      v4d rc = phir[i] - vload<v4d>(ai + k0) - vload<v4d>(phic + k0);
      rc = rc > v4d{} ? rc : v4d{};
      const v4d cand = di + rc;
      const v4d cur = vload<v4d>(dc + k0);
      const v4l open = ((v4l{} + int64_t(blocked >> k0)) >> lane & 1) == v4l{};
      const v4l better = (cand < cur) & open;
      vstore(dc + k0, better ? cand : cur);
      vstore(predc + k0, better ? (v4l{} + i) : vload<v4l>(predc + k0));
    }
  }

  // One shortest residual path from the over-full columns (all at distance 0) to the nearest
  // under-full one: Dijkstra on reduced costs over the columns, a row's distance being the best
  // over the settled columns that keep it (cancel (i, j): cost +a_ij), re-offered when it improves.
  // Moves one unit along the path and updates the potentials.
  void augment() {
    const int m = MT ? MT : m_, P = MT ? ((MT + 7) & ~7) : P_;
    for (int k = 0; k < m; ++k) {
      dc[k] = load[k] > n ? 0.0 : INF;
      fc[k] = INF;
      dr[k] = INF;
      predc[k] = -1;
    }
    for (int k = m; k < ((m + 3) & ~3); ++k) dc[k] = INF;
    u64 donec = ~all;
    int t = -1;
    double dist = 0.0;
    while (true) {
      // The nearest unsettled column; the lowest index on ties.
      v4d lo = vload<v4d>(dc);
      for (int k = 4; k < m; k += 4) { const v4d x = vload<v4d>(dc + k); lo = x < lo ? x : lo; }
      const double v = std::min(std::min(lo[0], lo[1]), std::min(lo[2], lo[3]));
      TORCH_CHECK(v < INF, "transposable_exact: no under-full column is reachable (internal error)");
      int j = 0;
      while (dc[j] != v) ++j;
      dc[j] = INF;
      fc[j] = v;
      donec |= u64(1) << j;
      if (load[j] < n) { t = j; dist = v; break; }
      for (u64 q = colsel[j]; q; q &= q - 1) {
        const int i = lowest(q);
        const double di = v + std::max(0.0, a[i * P + j] + phic[j] - phir[i]);
        if (di < dr[i]) {
          dr[i] = di;
          predr[i] = j;
          relax_row(i, di, rowsel[i] | donec);
        }
      }
    }
    // Potentials += min(distance, distance to t): every reduced cost stays >= 0, the path's become 0.
    for (int k = 0; k < m; ++k) {
      phic[k] += std::min(fc[k], dist);
      phir[k] += std::min(dr[k], dist);
    }
    int j = t;
    while (predc[j] >= 0) {
      const int i = int(predc[j]), jp = predr[i];
      rowsel[i] = (rowsel[i] | (u64(1) << j)) & ~(u64(1) << jp);
      colsel[j] |= u64(1) << i;
      colsel[jp] &= ~(u64(1) << i);
      j = jp;
    }
    --load[j];
    ++load[t];
  }

  void solve() {
    const int m = MT ? MT : m_;
    start();
    int excess = 0;
    for (int j = 0; j < m; ++j) {
      load[j] = __builtin_popcountll(colsel[j]);
      excess += std::max(0, load[j] - n);
    }
    while (excess-- > 0) augment();
  }
};

// Price rounds before the shortest paths (measured on Gaussian tiles: fewer paths pay for them).
inline int rounds_for(int m) { return m <= 4 ? 0 : m <= 16 ? 2 : 3; }

// Tiles go out in blocks of about 4096 entries from a shared counter, so a thread that the OS
// runs less (a busy machine) takes fewer blocks instead of holding up the others; a call with
// fewer than 16 blocks per thread uses fewer threads. Which thread solves a tile never changes it.
template <int MT, typename T>
void solve_all(const torch::Tensor& w, torch::Tensor& out, int n, int m) {
  const int64_t R = w.size(0), C = w.size(1), tc = C / m, tiles = (R / m) * tc;
  const T* wv = w.data_ptr<T>();
  bool* ov = out.data_ptr<bool>();
  const int64_t block = std::max<int64_t>(1, 4096 / (int64_t(m) * m));
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tiles / (16 * block)));
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    auto owner = std::make_unique<Solver<MT>>(m, n, rounds_for(m));
    Solver<MT>& sv = *owner;
    for (int64_t t0; (t0 = next.fetch_add(block)) < tiles;) {
      for (int64_t t = t0; t < std::min(tiles, t0 + block); ++t) {
        const int64_t r0 = (t / tc) * m, c0 = (t % tc) * m;
        sv.load_tile(wv + r0 * C + c0, C);
        sv.solve();
        for (int i = 0; i < m; ++i) {
          bool* o = ov + (r0 + i) * C + c0;
          for (int j = 0; j < m; ++j) o[j] = (sv.rowsel[i] >> j) & 1;
        }
      }
    }
  };
  if (workers == 1) {
    work();
  } else {
    at::parallel_for(0, workers, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t k = b0; k < b1; ++k) work();
    });
  }
}

// The common tile sizes get a solver compiled for them.
template <typename T>
void solve_sized(const torch::Tensor& w, torch::Tensor& out, int n, int m) {
  switch (m) {
    case 8: return solve_all<8, T>(w, out, n, m);
    case 16: return solve_all<16, T>(w, out, n, m);
    case 32: return solve_all<32, T>(w, out, n, m);
    default: return solve_all<0, T>(w, out, n, m);
  }
}

// The checks both entry points make; makes w contiguous and returns an uninitialised bool mask like it.
torch::Tensor checked_mask(torch::Tensor& w, int64_t n, int64_t m, const char* fn) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2, fn, ": w must be a 2-D CPU tensor");
  TORCH_CHECK(w.scalar_type() == torch::kFloat || w.scalar_type() == torch::kDouble, fn, ": w must be float32 or float64");
  TORCH_CHECK(m >= 1 && m <= MAXM, fn, ": m must be in [1, ", MAXM, "], got ", m);
  TORCH_CHECK(n >= 0 && n <= m, fn, ": n must be in [0, m], got ", n);
  TORCH_CHECK(w.size(0) % m == 0 && w.size(1) % m == 0, fn, ": w's dims must be multiples of m");
  w = w.contiguous();
  return torch::empty(w.sizes(), w.options().dtype(torch::kBool));
}

torch::Tensor transposable_exact(torch::Tensor w, int64_t n, int64_t m) {
  auto out = checked_mask(w, n, m, "transposable_exact");
  if (w.numel() == 0) return out;
  if (n == 0 || n == m) return out.fill_(n == m);
  if (w.scalar_type() == torch::kFloat) solve_sized<float>(w, out, int(n), int(m));
  else solve_sized<double>(w, out, int(n), int(m));
  return out;
}

// The 2-approximation of Hubara et al. (patterns.transposable._greedy, same mask): per tile, entries by
// descending |w| (NaN and inf first; ties to the lower row-major position), each kept while its row and
// its column hold fewer than n; a tile stops once it holds n * m.
// Sort keys: a float32 magnitude packs with its position into one 64-bit integer (the bits of a
// non-negative float order as the float does; the inverted position breaks ties to the lower one), so
// a tile sorts as integers (sort_keys); float64 magnitudes sort as (magnitude, position) pairs.
struct DKey {
  double a;
  int idx;
};

inline u64 key_of(float v, int idx) {
  float a = std::abs(v);
  if (std::isnan(a)) a = FINF;
  uint32_t b;
  std::memcpy(&b, &a, sizeof b);
  return (u64(b) << 32) | u64(~uint32_t(idx));
}
inline int idx_of(u64 k) { return int(~uint32_t(k)); }

inline DKey key_of(double v, int idx) {
  const double a = std::abs(v);
  return {std::isnan(a) ? INF : a, idx};
}
inline int idx_of(const DKey& k) { return k.idx; }

inline bool first(u64 x, u64 y) { return x > y; }
inline bool first(const DKey& x, const DKey& y) { return x.a > y.a || (x.a == y.a && x.idx < y.idx); }

// Sorts key[0, len) into first-order with tmp as scratch: runs of 4 by a sorting network, then merges
// whose select is branch-free (a tile's order is random, so std::sort's compare branches mispredict
// about half the time; this is 1.3-1.5x faster for 8x8 and 16x16 tiles).
template <typename Key>
void sort_keys(Key* key, Key* tmp, int len) {
  auto swap_if = [](Key& a, Key& b) {
    const Key x = a, y = b;
    const bool keep = !first(y, x);
    a = keep ? x : y;
    b = keep ? y : x;
  };
  int r = 0;
  for (; r + 4 <= len; r += 4) {
    Key* p = key + r;
    swap_if(p[0], p[1]), swap_if(p[2], p[3]), swap_if(p[0], p[2]), swap_if(p[1], p[3]), swap_if(p[1], p[2]);
  }
  std::sort(key + r, key + len, [](const Key& x, const Key& y) { return first(x, y); });
  Key *src = key, *dst = tmp;
  for (int w = 4; w < len; w *= 2, std::swap(src, dst))
    for (int lo = 0; lo < len; lo += 2 * w) {
      const int mid = std::min(lo + w, len), hi = std::min(lo + 2 * w, len);
      int i = lo, j = mid, k = lo;
      while (i < mid && j < hi) {
        const bool t = !first(src[j], src[i]);  // ties keep the left run's entry first
        dst[k++] = t ? src[i] : src[j];
        i += t, j += !t;
      }
      while (i < mid) dst[k++] = src[i++];
      while (j < hi) dst[k++] = src[j++];
    }
  if (src != key) std::copy(src, src + len, key);
}

template <typename T>
void greedy_all(const torch::Tensor& w, torch::Tensor& out, int n, int m) {
  using Key = decltype(key_of(T(0), 0));
  const int64_t C = w.size(1), tc = C / m, tiles = (w.size(0) / m) * tc;
  const T* wv = w.data_ptr<T>();
  bool* ov = out.data_ptr<bool>();
  at::parallel_for(0, tiles, 64, [&](int64_t lo, int64_t hi) {
    Key key[MAXM * MAXM], tmp[MAXM * MAXM];
    int rc[MAXM], cc[MAXM];
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t r0 = (t / tc) * m, c0 = (t % tc) * m;
      for (int i = 0; i < m; ++i) {
        const T* row = wv + (r0 + i) * C + c0;
        for (int j = 0; j < m; ++j) key[i * m + j] = key_of(row[j], i * m + j);
        std::memset(ov + (r0 + i) * C + c0, 0, m);
      }
      sort_keys(key, tmp, m * m);
      std::fill(rc, rc + m, 0);
      std::fill(cc, cc + m, 0);
      for (int q = 0, kept = 0; q < m * m && kept < n * m; ++q) {
        const int e = idx_of(key[q]), i = e / m, j = e % m;
        if (rc[i] < n && cc[j] < n) {
          ov[(r0 + i) * C + c0 + j] = true;
          ++rc[i], ++cc[j], ++kept;
        }
      }
    }
  });
}

torch::Tensor transposable_greedy(torch::Tensor w, int64_t n, int64_t m) {
  auto out = checked_mask(w, n, m, "transposable_greedy");
  if (w.numel() == 0) return out;
  if (w.scalar_type() == torch::kFloat) greedy_all<float>(w, out, int(n), int(m));
  else greedy_all<double>(w, out, int(n), int(m));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("transposable_greedy", &transposable_greedy,
        "greedy (2-approximate) transposable N:M mask of a 2-D float32/float64 CPU matrix");
  m.def("transposable_exact", &transposable_exact,
        "exact transposable N:M mask of a 2-D float32/float64 CPU matrix (every m x m tile: n per row and column)");
}
