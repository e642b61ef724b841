// Exact transposable N:M masks: per m x m tile of |W|, the 0/1 mask with exactly n ones in every
// row and every column that keeps the largest sum (a maximum-weight bipartite b-matching).
//
// Built on first use by nmsparse.kernels.transposable (kernels/_extensions.py) into the extension
// that provides transposable_exact. Method, per tile (see transposable.py's docstring):
//   min-cost flow rows -> columns, edge (i, j) of capacity 1 and cost -|w_ij|, solved by successive
//   shortest paths with potentials (the primal-dual method; its LP optimum is integral, so the
//   result is the exact optimum). Start: every row keeps its top n (ties to the lower column), which
//   is optimal while column counts are ignored; row potentials = each row's n-th largest make every
//   reduced cost >= 0. Then, while a column holds more than n, move one unit from the lowest such
//   column to the nearest column holding fewer than n along a shortest residual path (Dijkstra on
//   reduced costs: column -> row cancels a kept entry, row -> column keeps a new one); each move keeps
//   the mask optimal for its current column counts, and the last one makes every count n.
// Arithmetic is double (float32 magnitudes are exact in it); round-off that would make a reduced
// cost negative is clamped to 0, so Dijkstra stays valid on ties. Every choice breaks ties by the
// lowest index, so the mask is a deterministic function of the tile, whatever the thread count.
// Non-finite magnitudes (NaN, inf) count as larger than the tile's finite sum, as in the torch path.
// Tiles are independent: at::parallel_for over tiles (torch.get_num_threads() threads).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int MAXM = 64;  // rows and columns of a tile are held as 64-bit sets
using u64 = uint64_t;

inline int lowest(u64 s) { return __builtin_ctzll(s); }

struct Solver {
  int m, n;
  std::vector<double> a;  // m x m magnitudes of the current tile
  u64 rowsel[MAXM], colsel[MAXM];  // kept columns of each row, kept rows of each column
  double phr[MAXM], phc[MAXM], dr[MAXM], dc[MAXM];
  int load[MAXM], predr[MAXM], predc[MAXM], idx[MAXM];

  Solver(int m_, int n_) : m(m_), n(n_), a(size_t(m_) * m_) {}

  template <typename T>
  void load_tile(const T* w, int64_t ld) {
    bool finite = true;
    double top = 0.0;
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < m; ++j) {
        const double v = std::fabs(static_cast<double>(w[i * ld + j]));
        a[i * m + j] = v;
        if (std::isfinite(v)) top = std::max(top, v); else finite = false;
      }
    }
    if (finite) return;
    // Above any finite sum of the tile (same rule as patterns.transposable._tile_weights).
    const double big = std::min(top * 4.0 * m * m + 1.0, DBL_MAX / (4.0 * m * m));
    for (int k = 0; k < m * m; ++k) if (!std::isfinite(a[k])) a[k] = big;
  }

  // Every row keeps its n largest (ties to the lower column); row potential = its n-th largest.
  void start() {
    for (int j = 0; j < m; ++j) { colsel[j] = 0; phc[j] = 0.0; }
    for (int i = 0; i < m; ++i) {
      const double* r = &a[i * m];
      for (int j = 0; j < m; ++j) idx[j] = j;
      auto before = [r](int x, int y) { return r[x] > r[y] || (r[x] == r[y] && x < y); };
      std::nth_element(idx, idx + (n - 1), idx + m, before);
      u64 s = 0;
      double t = r[idx[n - 1]];
      for (int k = 0; k < n; ++k) { s |= u64(1) << idx[k]; t = std::min(t, r[idx[k]]); }
      rowsel[i] = s;
      phr[i] = t;
      for (u64 b = s; b; b &= b - 1) colsel[lowest(b)] |= u64(1) << i;
    }
    for (int j = 0; j < m; ++j) load[j] = __builtin_popcountll(colsel[j]);
  }

  // One shortest path from over-full column s to the nearest under-full column; moves one unit.
  void augment(int s) {
    const double inf = std::numeric_limits<double>::infinity();
    for (int k = 0; k < m; ++k) { dr[k] = inf; dc[k] = inf; }
    dc[s] = 0.0;
    u64 doner = 0, donec = 0;
    const u64 all = m == 64 ? ~u64(0) : (u64(1) << m) - 1;
    int t = -1;
    double dist = 0.0;
    while (true) {
      // The unsettled node at the smallest distance: columns first on ties, then the lower index.
      int bc = -1, br = -1;
      double vc = inf, vr = inf;
      for (u64 b = all & ~donec; b; b &= b - 1) { const int j = lowest(b); if (dc[j] < vc) { vc = dc[j]; bc = j; } }
      for (u64 b = all & ~doner; b; b &= b - 1) { const int i = lowest(b); if (dr[i] < vr) { vr = dr[i]; br = i; } }
      TORCH_CHECK(bc >= 0 || br >= 0, "transposable_exact: no under-full column is reachable (internal error)");
      if (bc >= 0 && vc <= vr) {
        const int j = bc;
        donec |= u64(1) << j;
        if (load[j] < n) { t = j; dist = vc; break; }
        for (u64 b = colsel[j] & ~doner; b; b &= b - 1) {  // cancel kept (i, j): cost +a_ij
          const int i = lowest(b);
          const double nd = vc + std::max(0.0, a[i * m + j] + phc[j] - phr[i]);
          if (nd < dr[i]) { dr[i] = nd; predr[i] = j; }
        }
      } else {
        const int i = br;
        doner |= u64(1) << i;
        const double* r = &a[i * m];
        for (u64 b = all & ~rowsel[i] & ~donec; b; b &= b - 1) {  // keep new (i, j): cost -a_ij
          const int j = lowest(b);
          const double nd = vr + std::max(0.0, phr[i] - r[j] - phc[j]);
          if (nd < dc[j]) { dc[j] = nd; predc[j] = i; }
        }
      }
    }
    for (int k = 0; k < m; ++k) {  // potentials += min(distance, distance to t): reduced costs stay >= 0
      phr[k] += std::min(dr[k], dist);
      phc[k] += std::min(dc[k], dist);
    }
    for (int j = t; j != s;) {
      const int i = predc[j], jp = predr[i];
      rowsel[i] = (rowsel[i] | (u64(1) << j)) & ~(u64(1) << jp);
      colsel[j] |= u64(1) << i;
      colsel[jp] &= ~(u64(1) << i);
      j = jp;
    }
    --load[s];
    ++load[t];
  }

  void solve() {
    start();
    for (int s = 0; s < m; ++s) {
      while (load[s] > n) augment(s);
    }
  }
};

template <typename T>
void solve_all(const torch::Tensor& w, torch::Tensor& out, int n, int m) {
  const int64_t R = w.size(0), C = w.size(1), tc = C / m, tiles = (R / m) * tc;
  const T* wv = w.data_ptr<T>();
  bool* ov = out.data_ptr<bool>();
  // About 8 tiles of 8x8 per work item, fewer for larger tiles.
  const int64_t grain = std::max<int64_t>(1, 512 / (int64_t(m) * m));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    Solver sv(m, n);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = (t / tc) * m, c0 = (t % tc) * m;
      sv.load_tile(wv + r0 * C + c0, C);
      sv.solve();
      for (int i = 0; i < m; ++i) {
        bool* o = ov + (r0 + i) * C + c0;
        for (int j = 0; j < m; ++j) o[j] = (sv.rowsel[i] >> j) & 1;
      }
    }
  });
}

torch::Tensor transposable_exact(torch::Tensor w, int64_t n, int64_t m) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2, "transposable_exact: w must be a 2-D CPU tensor");
  TORCH_CHECK(w.scalar_type() == torch::kFloat || w.scalar_type() == torch::kDouble,
              "transposable_exact: w must be float32 or float64");
  TORCH_CHECK(m >= 1 && m <= MAXM, "transposable_exact: m must be in [1, ", MAXM, "], got ", m);
  TORCH_CHECK(n >= 0 && n <= m, "transposable_exact: n must be in [0, m], got ", n);
  TORCH_CHECK(w.size(0) % m == 0 && w.size(1) % m == 0, "transposable_exact: w's dims must be multiples of m");
  w = w.contiguous();
  auto out = torch::empty(w.sizes(), w.options().dtype(torch::kBool));
  if (w.numel() == 0) return out;
  if (n == 0 || n == m) return out.fill_(n == m);
  if (w.scalar_type() == torch::kFloat) solve_all<float>(w, out, int(n), int(m));
  else solve_all<double>(w, out, int(n), int(m));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("transposable_exact", &transposable_exact,
        "exact transposable N:M mask of a 2-D float32/float64 CPU matrix (every m x m tile: n per row and column)");
}
