// Block-sparse (8x8 BSR) conv / matmul and few-row GEMV kernels for the CPU.
//
// Built on first use by nmsparse.kernels.block_cpu (kernels/_extensions.py, torch.utils.cpp_extension)
// into the extension that provides bsr8_conv and bsr8_gemv. See block_cpu.py's docstring for the
// method: direct reads from zero-padded stride-phase planes (or im2col panels), 48-position
// chunks, 16-wide GCC vector FMAs. The build's cache key hashes this file, so an edit rebuilds.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <sys/mman.h>

typedef float vf __attribute__((vector_size(64)));  // 16 floats

namespace {

constexpr int64_t LB = 48;  // panel width: 3 vectors

struct Geo {
  int64_t B, C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw, K;
};

inline vf vload(const float* p) { vf v; std::memcpy(&v, p, sizeof(vf)); return v; }
inline void vstore(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

// Panel rows k = (c, a, b) in F.unfold order, LB columns: output positions [l0, l0 + n) of image img.
void pack_panel(const float* x, const Geo& g, int64_t img, int64_t l0, int64_t n, float* P) {
  const float* xb = x + img * g.C * g.H * g.W;
  const bool plain = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0;
  if (plain) {  // the panel is a block of rows of x itself
    for (int64_t c = 0; c < g.C; ++c) {
      float* row = P + c * LB;
      std::memcpy(row, xb + c * g.H * g.W + l0, n * sizeof(float));
      std::fill(row + n, row + LB, 0.f);
    }
    return;
  }
  // Segments of the chunk that lie in one output row: first input row/column (before the kernel
  // offset), length and panel column.
  int64_t seg_ih[LB], seg_iw[LB], seg_len[LB], seg_col[LB], nseg = 0;
  for (int64_t l = l0, col = 0; l < l0 + n;) {
    const int64_t oh = l / g.Wo, ow = l % g.Wo;
    const int64_t len = std::min(g.Wo - ow, l0 + n - l);
    seg_ih[nseg] = oh * g.sh - g.ph; seg_iw[nseg] = ow * g.sw - g.pw;
    seg_len[nseg] = len; seg_col[nseg] = col; ++nseg;
    l += len; col += len;
  }
  float* row = P;
  for (int64_t c = 0; c < g.C; ++c) {
    const float* xc = xb + c * g.H * g.W;
    for (int64_t a = 0; a < g.kh; ++a) {
      for (int64_t b = 0; b < g.kw; ++b, row += LB) {
        for (int64_t s = 0; s < nseg; ++s) {
          float* dst = row + seg_col[s];
          const int64_t len = seg_len[s];
          const int64_t ih = seg_ih[s] + a * g.dh;
          if (ih < 0 || ih >= g.H) {
            for (int64_t t = 0; t < len; ++t) dst[t] = 0.f;
            continue;
          }
          const float* xr = xc + ih * g.W;
          const int64_t iw0 = seg_iw[s] + b * g.dw;
          int64_t lo, hi;  // valid t: 0 <= iw0 + t * sw < W
          if (g.sw == 1) {
            lo = std::max<int64_t>(0, -iw0);
            hi = std::min<int64_t>(len, g.W - iw0);
          } else {
            lo = iw0 >= 0 ? 0 : (-iw0 + g.sw - 1) / g.sw;
            hi = iw0 >= g.W ? 0 : (g.W - iw0 + g.sw - 1) / g.sw;
            hi = std::min(hi, len);
          }
          lo = std::min(lo, len);
          hi = std::max(hi, lo);
          for (int64_t t = 0; t < lo; ++t) dst[t] = 0.f;
          if (g.sw == 1) {
            std::memcpy(dst + lo, xr + iw0 + lo, (hi - lo) * sizeof(float));
          } else {
            for (int64_t t = lo; t < hi; ++t) dst[t] = xr[iw0 + t * g.sw];
          }
          for (int64_t t = hi; t < len; ++t) dst[t] = 0.f;
        }
        for (int64_t t = n; t < LB; ++t) row[t] = 0.f;
      }
    }
  }
}

// Output lanes [lane, lane + len) of a chunk go to output positions [pos, pos + len).
struct Seg { int64_t lane, pos, len; };

// One block row (8 outputs) over one chunk: acc = sum over kept blocks W_rj (8x8) @ X_j (8 x 16*NV),
// where row k of X starts at src + off[k] (a panel row, or the input itself in direct mode).
template <int NV>
void block_row(const float* vals, const int32_t* cols, int32_t p0, int32_t p1, const float* src,
               const int64_t* off, const float* bias, float* y, int64_t ystride, const Seg* segs, int nseg) {
  vf acc[8][NV];
  for (int o = 0; o < 8; ++o) {
    const float b0 = bias ? bias[o] : 0.f;
    for (int v = 0; v < NV; ++v) acc[o][v] = vf{} + b0;
  }
  for (int32_t p = p0; p < p1; ++p) {
    const float* w = vals + (int64_t)p * 64;
    const int64_t* ko = off + (int64_t)cols[p] * 8;
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      const float* xp = src + ko[i];
      vf xv[NV];
      for (int v = 0; v < NV; ++v) xv[v] = vload(xp + 16 * v);
#pragma GCC unroll 8
      for (int o = 0; o < 8; ++o) {
        const float wo = w[o * 8 + i];
        for (int v = 0; v < NV; ++v) acc[o][v] += wo * xv[v];
      }
    }
  }
  if (nseg == 1 && segs[0].lane == 0 && segs[0].len == 16 * NV) {
    for (int o = 0; o < 8; ++o)
      for (int v = 0; v < NV; ++v) vstore(y + o * ystride + segs[0].pos + 16 * v, acc[o][v]);
    return;
  }
  alignas(64) float tmp[16 * NV];
  for (int o = 0; o < 8; ++o) {
    for (int v = 0; v < NV; ++v) vstore(tmp + 16 * v, acc[o][v]);
    for (int s = 0; s < nseg; ++s)
      std::memcpy(y + o * ystride + segs[s].pos, tmp + segs[s].lane, segs[s].len * sizeof(float));
  }
}

// The direct-mode input: for every image, channel and used stride phase (pa, pb) a zero-padded plane
// Xq[i][j] = x[i*sh + pa - ph][j*sw + pb - pw] (zero outside x) of Hq x Wq, then `slack` zeros.
// The buffer is kept per calling thread (grown when needed): a fresh multi-MB allocation per call
// would pay for its page faults every time; 2 MiB aligned, asking for huge pages.
float* phase_input(const float* xv, const Geo& g, const std::vector<int64_t>& phases, int64_t Hq, int64_t Wq,
                   int64_t slack) {
  thread_local float* buf = nullptr;
  thread_local size_t cap = 0;
  const int64_t nph = (int64_t)phases.size(), plane = Hq * Wq, planes = g.B * g.C * nph;
  const size_t huge = size_t(1) << 21;
  const size_t bytes = ((size_t(planes * plane + slack) * sizeof(float) + huge - 1) / huge) * huge;
  if (bytes > cap) {
    std::free(buf);
    cap = 0;
    buf = static_cast<float*>(std::aligned_alloc(huge, bytes));
    TORCH_CHECK(buf != nullptr, "bsr8_conv: out of memory for the padded input (", bytes, " bytes)");
    cap = bytes;
#ifdef MADV_HUGEPAGE
    madvise(buf, bytes, MADV_HUGEPAGE);
#endif
  }
  float* dst = buf;
  at::parallel_for(0, planes, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t pa = phases[q % nph] / g.sw, pb = phases[q % nph] % g.sw;
      const float* xc = xv + (q / nph) * g.H * g.W;
      // valid j: 0 <= j*sw + pb - pw < W
      const int64_t lo = std::min(Wq, std::max<int64_t>(0, (g.pw - pb + g.sw - 1) / g.sw));
      const int64_t hi = std::max(lo, std::min(Wq, (g.W + g.pw - pb + g.sw - 1) / g.sw));
      for (int64_t i = 0; i < Hq; ++i) {
        float* row = dst + q * plane + i * Wq;
        const int64_t h = i * g.sh + pa - g.ph;
        if (h < 0 || h >= g.H) { std::fill(row, row + Wq, 0.f); continue; }
        const float* xr = xc + h * g.W + pb - g.pw;
        std::fill(row, row + lo, 0.f);
        if (g.sw == 1) std::memcpy(row + lo, xr + lo, (hi - lo) * sizeof(float));
        else for (int64_t j = lo; j < hi; ++j) row[j] = xr[j * g.sw];
        std::fill(row + hi, row + Wq, 0.f);
      }
    }
  });
  std::fill(dst + planes * plane, dst + planes * plane + slack, 0.f);
  return buf;
}

}  // namespace

// y (B, Co, Ho*Wo) = conv(x (B, C, H, W)) with the (Co, C*kh*kw) weight in 8x8 BSR form.
// "Direct" (the default): the input is rewritten once into zero-padded planes per stride phase
// (phase_input), in which the input of kernel tap (c, a, b) for output (oh, ow) is
// Xq[c, phase][oh + a dh / sh][ow + b dw / sw]. Output positions are walked on the grid Ho x Wq, so
// for a chunk of consecutive positions every tap is a contiguous run: each block reads its 8 rows
// straight from Xq and no im2col panel is built; the Wq - Wo wrap-around lanes of each grid row are
// computed and dropped. A plain 1x1 conv reads x itself. direct_ok = false builds a K x 48 im2col
// panel per chunk instead (pack_panel), as plain 1x1 convs do for a partial last chunk.
torch::Tensor bsr8_conv(torch::Tensor values, torch::Tensor crow, torch::Tensor col,
                        torch::optional<torch::Tensor> bias, torch::Tensor x, int64_t co,
                        int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                        int64_t dh, int64_t dw, bool direct_ok) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && values.scalar_type() == torch::kFloat,
              "bsr8_conv: float32 only");
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), "bsr8_conv: x must be a contiguous NCHW tensor");
  TORCH_CHECK(values.is_contiguous() && values.dim() == 3 && values.size(1) == 8 && values.size(2) == 8,
              "bsr8_conv: values must be contiguous (nnzb, 8, 8)");
  TORCH_CHECK(crow.scalar_type() == torch::kInt && col.scalar_type() == torch::kInt,
              "bsr8_conv: int32 indices");
  TORCH_CHECK(co % 8 == 0 && crow.numel() == co / 8 + 1, "bsr8_conv: crow does not match co");
  Geo g;
  g.B = x.size(0); g.C = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.kh = kh; g.kw = kw; g.sh = sh; g.sw = sw; g.ph = ph; g.pw = pw; g.dh = dh; g.dw = dw;
  g.Ho = (g.H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  g.Wo = (g.W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  g.K = g.C * kh * kw;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "bsr8_conv: empty output");
  TORCH_CHECK(g.K % 8 == 0, "bsr8_conv: C*kh*kw must be a multiple of 8");
  const int64_t L = g.Ho * g.Wo, R = co / 8;
  const bool plain = kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;
  const bool direct = direct_ok;
  // Direct grid: Hq x Wq planes; Lg lanes walked per image (the last row's wrap-around is skipped).
  const int64_t Hq = g.Ho + (kh - 1) * dh / sh, Wq = g.Wo + (kw - 1) * dw / sw;
  const int64_t Wg = direct ? Wq : g.Wo, Lg = direct ? (g.Ho - 1) * Wg + g.Wo : L;
  std::vector<int64_t> slot(sh * sw, -1), phases;  // used stride phases pa * sw + pb
  for (int64_t a = 0; a < kh; ++a)
    for (int64_t b = 0; b < kw; ++b) {
      const int64_t ph_ = (a * dh % sh) * sw + b * dw % sw;
      if (slot[ph_] < 0) { slot[ph_] = (int64_t)phases.size(); phases.push_back(ph_); }
    }
  const int64_t nph = (int64_t)phases.size();
  const float* src = x.data_ptr<float>();
  int64_t plane = g.H * g.W;
  if (direct && !plain) {
    src = phase_input(src, g, phases, Hq, Wq, 64);  // slack: the last chunk's vectors may run 15 lanes past
    plane = Hq * Wq;
  }
  const int64_t img_stride = g.C * nph * plane;
  std::vector<int64_t> off_direct(direct ? g.K : 0), off_panel(g.K), pf_rows;
  for (int64_t k = 0; k < g.K; ++k) off_panel[k] = k * LB;
  int64_t pf_span = LB;
  if (direct) {
    for (int64_t c = 0, k = 0; c < g.C; ++c)
      for (int64_t a = 0; a < kh; ++a)
        for (int64_t b = 0; b < kw; ++b, ++k) {
          const int64_t row = (c * nph + slot[(a * dh % sh) * sw + b * dw % sw]) * plane + (a * dh / sh) * Wq;
          off_direct[k] = row + b * dw / sw;
          pf_rows.push_back(row);
        }
    std::sort(pf_rows.begin(), pf_rows.end());
    pf_rows.erase(std::unique(pf_rows.begin(), pf_rows.end()), pf_rows.end());
    pf_span = LB + (kw - 1) * dw / sw;
  }
  auto y = torch::empty({g.B, co, L}, x.options());
  const float* xv = x.data_ptr<float>();
  const float* wv = values.data_ptr<float>();
  const int32_t* cr = crow.data_ptr<int32_t>();
  const int32_t* ci = col.data_ptr<int32_t>();
  const float* bv = nullptr;
  torch::Tensor bias_c;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->contiguous();
    TORCH_CHECK(bias_c.scalar_type() == torch::kFloat && bias_c.numel() == co, "bsr8_conv: bad bias");
    bv = bias_c.data_ptr<float>();
  }
  float* yv = y.data_ptr<float>();
  const int64_t per_img = (Lg + LB - 1) / LB, nchunks = g.B * per_img;
  const int64_t threads = at::get_num_threads();
  int64_t groups = nchunks >= threads ? 1 : std::min<int64_t>(R, (threads + nchunks - 1) / nchunks);
  groups = std::max<int64_t>(groups, 1);
  at::parallel_for(0, nchunks * groups, 1, [&](int64_t begin, int64_t end) {
    float* P = nullptr;
    int64_t packed = -1;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item / groups, grp = item % groups;
      const int64_t img = chunk / per_img, l0 = (chunk % per_img) * LB;
      const int64_t n = std::min(LB, Lg - l0);
      const int nv = (int)((n + 15) / 16);
      // A plain 1x1 conv reads x itself: a last chunk whose vectors would run past x is packed instead.
      const bool use_direct = direct && !(plain && 16 * nv != n);
      const float* base;
      const int64_t* off;
      if (use_direct) {
        base = src + img * img_stride + l0;
        off = off_direct.data();
        // The next chunk's input rows are scattered over the channel planes, which hardware
        // prefetchers do not follow; fetching them now hides memory latency behind this chunk's FMAs.
        if (grp == 0 && l0 + LB < Lg) {
          for (const int64_t r : pf_rows) {
            const char* p = reinterpret_cast<const char*>(base + r + LB);
            for (int64_t b = 0; b < pf_span * (int64_t)sizeof(float); b += 64) __builtin_prefetch(p + b, 0, 3);
          }
          // and its output lines, for writing (the output rows of all channels are as scattered)
          const int64_t ln = l0 + LB, pos = std::min(ln / Wg * g.Wo + std::min(ln % Wg, g.Wo), L - 1);
          for (int64_t o = 0; o < co; ++o) {
            const char* p = reinterpret_cast<const char*>(yv + (img * co + o) * L + pos);
            for (int64_t b = 0; b < LB * (int64_t)sizeof(float); b += 64) __builtin_prefetch(p + b, 1, 3);
          }
        }
      } else {
        if (P == nullptr) {
          P = static_cast<float*>(std::aligned_alloc(64, ((g.K * LB * sizeof(float) + 63) / 64) * 64));
          TORCH_CHECK(P != nullptr, "bsr8_conv: out of memory for the panel");
        }
        if (packed != chunk) { pack_panel(xv, g, img, l0, n, P); packed = chunk; }
        base = P;
        off = off_panel.data();
      }
      Seg segs[LB];
      int nseg = 0;
      if (Wg == g.Wo) {
        segs[nseg++] = Seg{0, l0, n};
      } else {  // keep the lanes of real output columns (ow < Wo)
        for (int64_t l = l0; l < l0 + n;) {
          const int64_t oh = l / Wg, ow = l % Wg;
          const int64_t len = std::min(Wg - ow, l0 + n - l);
          if (ow < g.Wo) segs[nseg++] = Seg{l - l0, oh * g.Wo + ow, std::min(len, g.Wo - ow)};
          l += len;
        }
      }
      if (nseg == 0) continue;
      const int64_t r0 = R * grp / groups, r1 = R * (grp + 1) / groups;
      for (int64_t r = r0; r < r1; ++r) {
        float* yr = yv + (img * co + r * 8) * L;
        const float* br = bv ? bv + r * 8 : nullptr;
        if (nv == 3) block_row<3>(wv, ci, cr[r], cr[r + 1], base, off, br, yr, L, segs, nseg);
        else if (nv == 2) block_row<2>(wv, ci, cr[r], cr[r + 1], base, off, br, yr, L, segs, nseg);
        else block_row<1>(wv, ci, cr[r], cr[r + 1], base, off, br, yr, L, segs, nseg);
      }
    }
    std::free(P);
  });
  return y;
}

// y (T, Co) = x (T, K) @ W^T for few rows T (a Linear on a small batch): weight-streaming GEMV.
// Each 8x8 block is 4 vectors of two weight rows; x's 8 inputs are duplicated into one vector.
torch::Tensor bsr8_gemv(torch::Tensor values, torch::Tensor crow, torch::Tensor col,
                        torch::optional<torch::Tensor> bias, torch::Tensor x, int64_t co) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && values.scalar_type() == torch::kFloat, "bsr8_gemv: float32 only");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "bsr8_gemv: x must be a contiguous (T, K) tensor");
  TORCH_CHECK(values.is_contiguous() && values.dim() == 3 && values.size(1) == 8 && values.size(2) == 8,
              "bsr8_gemv: values must be contiguous (nnzb, 8, 8)");
  TORCH_CHECK(crow.scalar_type() == torch::kInt && col.scalar_type() == torch::kInt, "bsr8_gemv: int32 indices");
  TORCH_CHECK(co % 8 == 0 && crow.numel() == co / 8 + 1, "bsr8_gemv: crow does not match co");
  const int64_t T = x.size(0), K = x.size(1), R = co / 8;
  auto y = torch::empty({T, co}, x.options());
  const float* xv = x.data_ptr<float>();
  const float* wv = values.data_ptr<float>();
  const int32_t* cr = crow.data_ptr<int32_t>();
  const int32_t* ci = col.data_ptr<int32_t>();
  torch::Tensor bias_c;
  const float* bv = nullptr;
  if (bias.has_value() && bias->defined()) {
    bias_c = bias->contiguous();
    TORCH_CHECK(bias_c.scalar_type() == torch::kFloat && bias_c.numel() == co, "bsr8_gemv: bad bias");
    bv = bias_c.data_ptr<float>();
  }
  float* yv = y.data_ptr<float>();
  at::parallel_for(0, R, 8, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t t = 0; t < T; ++t) {
        const float* xt = xv + t * K;
        vf acc[4] = {vf{}, vf{}, vf{}, vf{}};
        for (int32_t p = cr[r]; p < cr[r + 1]; ++p) {
          const float* w = wv + (int64_t)p * 64;
          const float* xj = xt + (int64_t)ci[p] * 8;
          vf xx;
          for (int q = 0; q < 8; ++q) { xx[q] = xj[q]; xx[q + 8] = xj[q]; }
          for (int q = 0; q < 4; ++q) acc[q] += vload(w + 16 * q) * xx;
        }
        float* yt = yv + t * co + r * 8;
        for (int o = 0; o < 8; ++o) {
          const vf& a = acc[o / 2];
          const int base = (o % 2) * 8;
          float sum = bv ? bv[r * 8 + o] : 0.f;
          for (int q = 0; q < 8; ++q) sum += a[base + q];
          yt[o] = sum;
        }
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bsr8_conv", &bsr8_conv, "8x8 block-sparse conv / matmul (direct for stride 1, else im2col panels)");
  m.def("bsr8_gemv", &bsr8_gemv, "8x8 block-sparse matrix times a few vectors (weight streaming)");
}
