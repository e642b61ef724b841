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
//
// This file: the methods over a view, choosing a path, and the entry points; nm_prune_tiles.h: the tile path (any
// m, dtype and layout); nm_prune_rows.h: the AVX2 row path (float32 n:4 along contiguous rows); nm_prune_planes.h:
// the AVX2 plane path (float32 n:4 across channels a plane apart, e.g. an NCHW conv gradient); nm_prune_common.h:
// what they share.

#include "nm_prune_planes.h"
#include "nm_prune_tiles.h"

namespace {

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
    if (rows_of(v) && method == MVUE) {
      for_rows(v, [&](int64_t b, int64_t o, int64_t bo) {  // group (b, o, g) is number bo * G + g
        mvue_row4(gp + v.at(b, o, 0, 0), op + vo.at(b, o, 0, 0), v.C, n, rnd, static_cast<uint64_t>(bo * (v.C / 4)));
      });
      return;
    }
    if (planes_of(v)) {  // channels a plane apart, positions contiguous: an NCHW conv gradient
      if (method == MAGNITUDE || method == RANDOM || method == RANDOM_UNBIASED)
        return prune_planes4(gp, op, v, vo, n, method, rnd, static_cast<float>(static_cast<double>(m) / n));
      if (method == RESCALE && v.O == 1 && !row) return rescale_planes4(gp, op, v, vo, n, eps);
      if (method == MVUE) return mvue_planes4(gp, op, v, vo, n, rnd);
    }
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
