"""Block sparsity masks: block structure, exact counts, lowest scores (vs a brute force), errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmsparse.patterns import block_mask, block_scores, expand_block_grid, global_block_mask

SETTINGS = settings(deadline=None)  # example count from the profile in conftest.py
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@st.composite
def weights(draw, conv=None, integer_valued=False, block=None):
    """A random 2-D or 4-D float weight with a block (drawn unless given) that divides it."""
    conv = draw(st.booleans()) if conv is None else conv
    sizes = st.sampled_from([1, 2, 3, 4, 8])
    bo, bi = (draw(sizes), draw(sizes)) if block is None else block
    go, gi = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if conv else ()
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    shape = (go * bo, gi * bi) + kernel
    if integer_valued:  # small integers: exact in every dtype, and many tied scores
        w = torch.randint(-2, 3, shape, generator=g).to(dtype)
    else:
        w = (torch.randn(shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 50.0])))
        w = w.to(dtype)
    return w, (bo, bi)


sparsities = st.one_of(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.99]), st.floats(0.0, 0.999))
scores = st.sampled_from(["l2", "l1", "var"])


def brute_scores(w, block, score, normalize=False):
    """Block scores in float64 with plain Python loops, the textbook formulas."""
    bo, bi = block
    x = w.double()
    if x.dim() == 2:
        x = x[:, :, None, None]
    co, ci, kh, kw = x.shape
    v = x.tolist()
    out = []
    for go in range(co // bo):
        row = []
        for gi in range(ci // bi):
            vals = [v[go * bo + r][gi * bi + c][i][j]
                    for r in range(bo) for c in range(bi) for i in range(kh) for j in range(kw)]
            if not all(math.isfinite(a) for a in vals):
                row.append(math.inf)
                continue
            size = len(vals)
            if score == "l2":
                s = math.sqrt(sum(a * a for a in vals))
                s = s / math.sqrt(size) if normalize else s
            elif score == "l1":
                s = sum(abs(a) for a in vals)
                s = s / size if normalize else s
            else:
                mean = sum(vals) / size
                s = sum((a - mean) ** 2 for a in vals) / size
            row.append(s)
        out.append(row)
    return out


def grid_of(mask, block):
    """(Co/bo, Ci/bi) grid of a mask, asserting it is constant inside every block (and kernel)."""
    bo, bi = block
    m = mask if mask.dim() == 4 else mask[:, :, None, None]
    co, ci = m.shape[:2]
    b = m.reshape(co // bo, bo, ci // bi, bi, -1).permute(0, 2, 1, 3, 4).reshape(co // bo, ci // bi, -1)
    assert bool((b.all(-1) == b.any(-1)).all()), "mask is not constant within a block"
    return b[..., 0]


def assert_lowest(pruned_flat, scores_flat):
    """The pruned entries are a set of lowest scores (up to float64 rounding)."""
    pruned = [s for p, s in zip(pruned_flat, scores_flat) if p]
    kept = [s for p, s in zip(pruned_flat, scores_flat) if not p]
    if pruned and kept:
        hi, lo = max(pruned), min(kept)
        assert hi <= lo or math.isclose(hi, lo, rel_tol=1e-9, abs_tol=1e-300), (hi, lo)


@SETTINGS
@given(weights(), sparsities, scores)
def test_mask_is_blockwise_with_exact_count(wb, sparsity, score):
    w, block = wb
    mask = block_mask(w, block, sparsity, score)
    assert mask.dtype == torch.bool and mask.shape == w.shape
    grid = grid_of(mask, block)
    nblocks = grid.numel()
    assert int((~grid).sum()) == round(sparsity * nblocks)
    assert torch.equal(block_mask(w, block, sparsity, score, return_grid=True), grid)
    assert torch.equal(expand_block_grid(grid, w.shape, block), mask)


@SETTINGS
@given(weights(), sparsities, scores)
def test_pruned_blocks_are_the_lowest_scoring(wb, sparsity, score):
    w, block = wb
    brute = brute_scores(w, block, score)
    got = block_scores(w, block, score)
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor(brute, dtype=torch.float64), rtol=1e-9, atol=1e-300)
    grid = block_mask(w, block, sparsity, score, return_grid=True)
    assert_lowest((~grid).flatten().tolist(), [s for row in brute for s in row])


@SETTINGS
@given(weights(integer_valued=True), sparsities)
def test_ties_prune_the_earlier_block_first(wb, sparsity):
    w, block = wb
    brute = [s for row in brute_scores(w, block, "l1") for s in row]  # exact: integer sums
    order = sorted(range(len(brute)), key=lambda i: (brute[i], i))
    k = round(sparsity * len(brute))
    expect = [i in set(order[:k]) for i in range(len(brute))]
    grid = block_mask(w, block, sparsity, "l1", return_grid=True)
    assert (~grid).flatten().tolist() == expect


def test_all_equal_blocks_prune_in_row_major_order():
    grid = block_mask(torch.ones(16, 24), (8, 8), 0.5, return_grid=True)
    assert grid.tolist() == [[False, False, False], [True, True, True]]


def test_scores_on_a_hand_example():
    w = torch.tensor([[1.0, 2.0, 0.0, 0.0],
                      [-2.0, 4.0, 3.0, -3.0]])
    assert block_scores(w, (2, 2), "l2").tolist() == [[5.0, math.sqrt(18.0)]]
    assert block_scores(w, (2, 2), "l1").tolist() == [[9.0, 6.0]]
    # population variance: [1, 2, -2, 4] has mean 1.25; [0, 0, 3, -3] has mean 0
    assert block_scores(w, (2, 2), "var").tolist() == [[pytest.approx(4.6875), pytest.approx(4.5)]]
    assert block_mask(w, (2, 2), 0.5, "l2").tolist() == [[True, True, False, False], [True, True, False, False]]
    assert block_mask(w, (2, 2), 0.5, "l1").tolist() == [[True, True, False, False], [True, True, False, False]]
    assert block_mask(w, (2, 2), 0.5, "var").tolist() == [[True, True, False, False], [True, True, False, False]]


@SETTINGS
@given(weights(conv=True), sparsities)
def test_conv_blocks_span_the_kernel(wb, sparsity):
    w, block = wb
    mask = block_mask(w, block, sparsity)
    assert bool((mask == mask[:, :, :1, :1]).all())
    # l1 and squared l2 add up over kernel positions
    per_pos = [block_scores(w[:, :, i, j], block, "l1") for i in range(w.shape[2]) for j in range(w.shape[3])]
    assert torch.allclose(block_scores(w, block, "l1"), sum(per_pos), rtol=1e-9)
    per_pos = [block_scores(w[:, :, i, j], block, "l2") ** 2 for i in range(w.shape[2]) for j in range(w.shape[3])]
    assert torch.allclose(block_scores(w, block, "l2") ** 2, sum(per_pos), rtol=1e-9)


def test_conv_block_kept_for_a_large_entry_at_any_kernel_position():
    w = torch.full((16, 16, 3, 3), 0.01)
    w[9, 3, 2, 1] = 5.0  # block (1, 0), far corner of the kernel
    grid = block_mask(w, (8, 8), 0.75, return_grid=True)
    assert grid.tolist() == [[False, False], [True, False]]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("score", ["l2", "l1", "var"])
def test_nonfinite_block_scores_highest_and_is_kept(bad, score):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)) * 100
    w[3, 20] = bad  # block (0, 2)
    s = block_scores(w, (8, 8), score)
    assert s[0, 2] == math.inf and bool(torch.isfinite(s.flatten()[torch.arange(8) != 2]).all())
    grid = block_mask(w, (8, 8), 0.875, score, return_grid=True)  # keeps 1 of 8 blocks
    assert grid.tolist() == [[False, False, True, False], [False, False, False, False]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_score_in_float64(dtype):
    w = torch.full((8, 8), 300.0, dtype=dtype)  # sum of squares overflows float16
    s = block_scores(w, (8, 8), "l2")
    assert s.dtype == torch.float64 and s.item() == pytest.approx(2400.0)
    assert block_scores(w, (8, 8), "l1").item() == 300.0 * 64


def test_sparsity_zero_keeps_all_and_input_untouched():
    w = torch.randn(8, 16, 2, 2, requires_grad=True)
    before = w.detach().clone()
    assert bool(block_mask(w, (4, 4), 0.0).all())
    assert torch.equal(w.detach(), before)


@SETTINGS
@given(st.data(), sparsities, scores, st.booleans())
def test_global_ranks_across_tensors(data, sparsity, score, normalize):
    sizes = st.sampled_from([1, 2, 3, 4, 8])
    block = (data.draw(sizes), data.draw(sizes))
    ws = [w for w, _ in data.draw(st.lists(weights(block=block), min_size=1, max_size=4))]
    named = {f"layer{i}": w for i, w in enumerate(ws)}
    masks = global_block_mask(named, block, sparsity, score, normalize)
    assert list(masks) == list(named)
    pruned, brute = [], []
    for name, w in named.items():
        assert masks[name].shape == w.shape and masks[name].dtype == torch.bool
        pruned += (~grid_of(masks[name], block)).flatten().tolist()
        brute += [s for row in brute_scores(w, block, score, normalize) for s in row]
    assert sum(pruned) == round(sparsity * len(brute))
    assert_lowest(pruned, brute)
    as_list = global_block_mask(ws, block, sparsity, score, normalize)
    assert isinstance(as_list, list) and all(torch.equal(a, b) for a, b in zip(as_list, masks.values()))
    grids = global_block_mask(ws, block, sparsity, score, normalize, return_grid=True)
    assert all(torch.equal(expand_block_grid(g, w.shape, block), m) for g, w, m in zip(grids, ws, as_list))


@SETTINGS
@given(weights(), sparsities, scores)
def test_global_on_one_tensor_matches_per_layer(wb, sparsity, score):
    w, block = wb
    (m,) = global_block_mask([w], block, sparsity, score, normalize=False)
    assert torch.equal(m, block_mask(w, block, sparsity, score))


@pytest.mark.parametrize("score", ["l2", "l1"])
@pytest.mark.parametrize("lin_value", [2.0, 0.5])
def test_global_normalisation_compares_per_element(score, lin_value):
    conv = torch.ones(16, 16, 3, 3)  # per-element magnitude 1, 9x as many elements per block
    lin = torch.full((16, 16), lin_value)
    weights = {"conv": conv, "fc": lin}
    fair = global_block_mask(weights, (8, 8), 0.5, score, normalize=True)
    # normalised: RMS (l2) or mean |w| (l1), i.e. the per-element magnitude, decides
    assert bool(fair["fc"].all()) == (lin_value > 1) and bool(fair["conv"].all()) == (lin_value < 1)
    raw = global_block_mask(weights, (8, 8), 0.5, score, normalize=False)
    # raw sums: a conv block (l2 24, l1 576) beats a linear block (l2 <= 16, l1 <= 128)
    assert bool(raw["conv"].all()) and not bool(raw["fc"].any())


def test_global_ties_prune_the_earlier_tensor_first():
    grids = global_block_mask([torch.ones(16, 8), torch.ones(16, 8)], (8, 8), 0.5, return_grid=True)
    assert [g.flatten().tolist() for g in grids] == [[False, False], [True, True]]


@pytest.mark.parametrize("shape", [(8,), (8, 8, 8), (8, 8, 1, 1, 1), ()])
def test_bad_rank(shape):
    with pytest.raises(ValueError, match=r"2-D .* 4-D") as e:
        block_mask(torch.zeros(shape), (8, 8))
    assert str(tuple(shape)) in str(e.value)


@pytest.mark.parametrize("shape,dim,size,fits", [((12, 16), 0, 12, "[1, 2, 3, 4, 6]"),
                                                  ((16, 20, 3, 3), 1, 20, "[1, 2, 4, 5]")])
def test_not_divisible(shape, dim, size, fits):
    with pytest.raises(ValueError) as e:
        block_scores(torch.zeros(shape), (8, 8))
    msg = str(e.value)
    assert f"dim {dim}" in msg and str(shape) in msg and "(8, 8)" in msg and str(size) in msg
    assert fits in msg and "pad" in msg  # what would work


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, math.nan])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        block_mask(torch.zeros(8, 8), (8, 8), sparsity)
    with pytest.raises(ValueError, match="sparsity"):
        global_block_mask([torch.zeros(8, 8)], (8, 8), sparsity)


def test_bad_score_lists_choices():
    with pytest.raises(ValueError, match=r"'l2', 'l1', 'var'.*'l3'"):
        block_mask(torch.zeros(8, 8), (8, 8), 0.5, "l3")
    with pytest.raises(ValueError, match="score"):
        block_scores(torch.zeros(8, 8), (8, 8), "max")
    with pytest.raises(ValueError, match="score"):
        global_block_mask([torch.zeros(8, 8)], (8, 8), 0.5, "L2")


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool])
def test_non_float_tensor(dtype):
    with pytest.raises(TypeError, match=str(dtype).replace("torch.", "")):
        block_mask(torch.zeros(8, 8, dtype=dtype), (8, 8))
    with pytest.raises(TypeError, match="weights\\['a'\\]"):
        global_block_mask({"a": torch.zeros(8, 8, dtype=dtype)}, (8, 8))


@pytest.mark.parametrize("block", [(0, 8), (8,), (8, 8, 8), 8, (8.0, 8), (True, 8), (-2, 2), "88", None])
def test_bad_block(block):
    with pytest.raises(ValueError, match="pair of positive ints"):
        block_mask(torch.zeros(8, 8), block)
    with pytest.raises(ValueError, match="pair of positive ints"):
        global_block_mask([torch.zeros(8, 8)], block)


def test_global_errors_name_the_tensor():
    with pytest.raises(ValueError, match=r"weights\['fc'\] dim 1"):
        global_block_mask({"conv": torch.zeros(8, 8, 3, 3), "fc": torch.zeros(8, 12)}, (8, 8))
    with pytest.raises(ValueError, match=r"weights\[1\].*shape \(8, 8, 8\)"):
        global_block_mask([torch.zeros(8, 8), torch.zeros(8, 8, 8)], (8, 8))
    with pytest.raises(TypeError, match="dict"):
        global_block_mask(torch.zeros(8, 8), (8, 8))
    assert global_block_mask({}, (8, 8)) == {}


def test_expand_grid_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(16, 24\)"):
        expand_block_grid(torch.ones(2, 2, dtype=torch.bool), (16, 24), (8, 8))


def test_on_device_matches_cpu(device):
    g = torch.Generator().manual_seed(1)
    ws = {"conv": torch.randn(16, 24, 3, 3, generator=g), "fc": torch.randn(32, 16, generator=g).half()}
    for w in ws.values():
        for score in ("l2", "l1", "var"):
            got = block_mask(w.to(device), (8, 8), 0.5, score)
            assert got.device.type == device and torch.equal(got.cpu(), block_mask(w, (8, 8), 0.5, score))
    got = global_block_mask({k: v.to(device) for k, v in ws.items()}, (8, 8), 0.6)
    want = global_block_mask(ws, (8, 8), 0.6)
    assert all(got[k].device.type == device and torch.equal(got[k].cpu(), want[k]) for k in ws)
