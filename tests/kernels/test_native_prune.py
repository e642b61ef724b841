"""The compiled one-pass CPU kernel (kernels/native_prune.py) against the torch path it replaces.

Every method must give the torch path's values bit for bit (same draws, same tie rule, same float
arithmetic), except rescale, whose plane sums are added in another order, and mvue with m > 8,
whose group sum the torch path takes with a reduction; those agree to the rounding.
"""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nmsparse.kernels import native_prune as native
from nmsparse.kernels.reference import prune_checked
from nmsparse.patterns.nm import is_nm, nm_mask

pytestmark = pytest.mark.skipif(not native.native_prune_available(),
                                reason=f"no C++ build: {native.native_prune_error()}")

METHODS = ("magnitude", "random", "rescale", "random-unbiased", "mvue")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _both(g, n, m, method, d, seed=5):
    ref = prune_checked(g, n, m, method, d, torch.Generator().manual_seed(seed), 1e-4)
    out = native.prune_grad_native(g, n, m, method, d, torch.Generator().manual_seed(seed), 1e-4)
    assert out is not None, "the kernel should apply here"
    return ref, out


def _agree(ref, out, method, m, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype and out.stride() == ref.stride()
    a, b = ref.double().nan_to_num(nan=7.0), out.double().nan_to_num(nan=7.0)
    if method == "rescale" or (method == "mvue" and m > 8):
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
        torch.testing.assert_close(b, a, rtol=tol, atol=1e-12)
        assert torch.equal(out == 0, ref == 0) or method == "rescale"
    else:
        assert torch.equal(a, b)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,d", [((4, 8, 5, 3), 1), ((6, 16), 1), ((3, 5, 24), 2), ((16, 3), 0),
                                     ((32,), 0), ((2, 16, 3, 3), 1),
                                     # rows of whole 8-group tiles and a partial one (the transposing gather)
                                     ((5, 80), 1), ((2, 3, 144), 2)])
@pytest.mark.parametrize("n,m", [(1, 2), (2, 4), (4, 8), (3, 8), (5, 16)])
def test_equals_the_torch_path(method, dtype, shape, d, n, m):
    if shape[d] % m:
        pytest.skip("channels not divisible by m")
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    g.view(-1)[::7] = 0  # groups with fewer than n nonzeros
    flat = g.view(-1)
    flat[1:-1:11] = flat[2::11][: flat[1:-1:11].numel()]  # ties
    ref, out = _both(g, n, m, method, d)
    _agree(ref, out, method, m, dtype)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_entries_are_kept(method):
    g = torch.randn(2, 8, 4, 4)
    g[0, 0, 0, 0], g[1, 5, 2, 1], g[0, 4:8, 3, 3] = math.nan, math.inf, -math.inf
    ref, out = _both(g, 2, 4, method, 1)
    _agree(ref, out, method, 4, g.dtype)
    assert out[0, 0, 0, 0].isnan() and not out[1, 4:8, 2, 1].isfinite().all()
    assert not out[0, 4:8, 3, 3].isfinite().all()  # a group of infinities stays non-finite


@pytest.mark.parametrize("method", METHODS)
def test_channels_last_keeps_its_layout(method):
    g = torch.randn(4, 8, 5, 5).to(memory_format=torch.channels_last)
    ref, out = _both(g, 2, 4, method, 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _agree(ref, out, method, 4, g.dtype)


def _same_bits(ref, out):
    """Equal to the bit (the sign of a zero included, which torch.equal does not see)."""
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}[ref.dtype]
    assert torch.equal(ref.contiguous().view(ints), out.contiguous().view(ints))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("shape,d", [((3, 12, 4, 8), 1), ((2, 3, 8, 4, 4), 2), ((8, 4, 3, 3), 0), ((5, 16, 1, 1), 1),
                                     ((3, 8, 16), 1)])
def test_channels_innermost_in_memory(method, dtype, n, shape, d):
    """Channels innermost in memory with dims after them (a channels_last gradient, any d) are viewed as rows: the
    same values as the torch path (entries and rescale's planes are counted in channels-last order) in g's layout."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=dtype).movedim(d, -1).contiguous()
    g.view(-1)[1::5] = -0.0  # zeros whose sign must survive
    g = g.movedim(-1, d)
    g[(0,) * g.dim()] = math.nan
    ref, out = _both(g, n, 4, method, d)
    assert out.stride() == g.stride()
    _agree(ref, out, method, 4, g.dtype)
    assert torch.equal(ref.isnan(), out.isnan())
    if method != "rescale":
        _same_bits(ref, out)


def test_strided_views():
    g = torch.randn(8, 6, 4).permute(2, 0, 1)  # (4, 8, 6), any strides: viewed as (4, 1, 8, 6)
    ref, out = _both(g, 2, 4, "mvue", 1)
    _agree(ref, out, "mvue", 4, g.dtype)
    g = torch.randn(2, 8, 5, 6).transpose(2, 3)  # the dims after the channels do not merge: torch path
    assert native.prune_grad_native(g, 2, 4, "magnitude", 1) is None


def test_where_the_kernel_does_not_apply():
    g = torch.randn(4, 8)
    assert native.prune_grad_native(g.requires_grad_(), 2, 4, "magnitude", 1) is None  # autograd through g
    assert native.prune_grad_native(torch.randn(4, 64), 2, 64, "magnitude", 1) is None  # m above MAX_M
    assert native.prune_grad_native(torch.randn(4, 8), 4, 4, "magnitude", 1) is None  # n == m: identity
    assert native.prune_grad_native(torch.randn(4, 8), 2, 4, "tile24", 1) is None
    assert native.nm_mask_native(torch.randn(4, 8), 0, 4, 1) is None


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(METHODS), st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (2, 8)]),
       st.integers(1, 3), st.integers(1, 3), st.integers(1, 7), st.integers(0, 2**31 - 1))
def test_property_same_as_torch(method, nm, batch, groups, inner, seed):
    n, m = nm
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(batch, groups * m, inner, generator=gen)
    g[torch.rand(g.shape, generator=gen) < 0.2] = 0
    ref, out = _both(g, n, m, method, 1, seed)
    _agree(ref, out, method, m, g.dtype)
    kept = (out != 0).movedim(1, -1).reshape(-1, m).sum(-1)
    assert (kept <= n).all()  # never more than n per group (fewer only where g has zeros)


@pytest.mark.parametrize("shape,d", [((64, 32, 3, 3), 1), ((48, 64), 1), ((8, 16, 1, 1), 1), ((24, 32), 0)])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (8, 16), (3, 32)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_equals_nm_mask(shape, d, n, m, dtype):
    if shape[d] % m:
        pytest.skip("channels not divisible by m")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    w.view(-1)[::5] = w.view(-1)[1::5]  # ties go to the earlier position in both
    w.view(-1)[3] = math.nan  # ranks as the largest
    got = native.nm_mask_native(w, n, m, d)
    assert got.dtype == torch.bool and got.is_contiguous()
    assert torch.equal(got, nm_mask(w, n, m, dim=d)) and is_nm(got, n, m, dim=d)


def test_mask_of_a_channels_last_weight():
    w = torch.randn(16, 8, 3, 3).to(memory_format=torch.channels_last)
    assert torch.equal(native.nm_mask_native(w, 2, 4, 1), nm_mask(w, 2, 4, dim=1))


def test_sdgp_layer_backward_uses_it_and_matches_the_reference(monkeypatch):
    from nmsparse.nn.sdgp import SDGPConv2d

    torch.manual_seed(0)
    layer = SDGPConv2d(8, 16, 3, padding=1, n=2, m=4, method="mvue", seed=3)
    state = {k: v.clone() for k, v in layer.state_dict().items()}  # step 0: the same draws below
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    calls = []
    kernel = native.prune_grad_native
    monkeypatch.setattr(native, "prune_grad_native", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    from nmsparse.kernels import ops
    monkeypatch.setattr(ops, "prune_grad_native", native.prune_grad_native)
    layer(x).square().sum().backward()
    assert calls, "the CPU backward should go through the kernel"
    fast = x.grad.clone()
    monkeypatch.setattr(ops, "prune_grad_native", lambda *a, **k: None)  # the torch path, same draws
    layer.load_state_dict(state)
    x.grad = None
    layer(x).square().sum().backward()
    assert torch.equal(fast, x.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_srste_elementwise_passes_equal_torch(dtype):
    gen = torch.Generator().manual_seed(4)
    w, g = torch.randn(64, 48, generator=gen).to(dtype), torch.randn(64, 48, generator=gen).to(dtype)
    w[0, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    mask = nm_mask(torch.randn(64, 48, generator=gen), 2, 4, dim=1)
    mask[0, :3] = False  # inf * 0 is NaN in torch's product: the kernel must agree
    out = native.masked_weight_native(w, mask)
    assert torch.equal(out.nan_to_num(nan=7.0), (w * mask).nan_to_num(nan=7.0))
    got = native.srste_grad_native(g, w, mask, 2e-4)
    assert torch.equal(got.nan_to_num(nan=7.0), (g + 2e-4 * w.masked_fill(mask, 0)).nan_to_num(nan=7.0))
    assert native.masked_weight_native(w.t(), mask.t()) is None  # not contiguous: the torch path


def test_srste_layer_gradients_with_and_without_the_kernel(monkeypatch):
    from nmsparse.nn import masked

    torch.manual_seed(0)
    for method in ("srste", "fixed"):
        from nmsparse import sparsify
        from nmsparse.nn.config import SparsityConfig, WeightNM
        model = sparsify(torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)),
                         SparsityConfig(weight=WeightNM(2, 4, method=method)))
        x = torch.randn(8, 32)
        used = []
        kernel = masked.srste_grad_native
        monkeypatch.setattr(masked, "srste_grad_native", lambda *a: used.append(kernel(*a)) or used[-1])
        model(x).square().sum().backward()
        monkeypatch.undo()
        if method == "srste":  # the backward gets the weight Parameter: the kernel must take it, not fall back
            assert used and all(u is not None for u in used)
        original = model[0].parametrizations.weight.original
        fast = original.grad.clone()
        model.zero_grad()
        monkeypatch.setattr(masked, "masked_weight_native", lambda *a: None)
        monkeypatch.setattr(masked, "srste_grad_native", lambda *a: None)
        model(x).square().sum().backward()
        assert torch.equal(fast, original.grad), method
        monkeypatch.undo()


@pytest.mark.slow
def test_compiled_sdgp_calls_the_kernel_through_the_custom_op(monkeypatch):
    """Under torch.compile, magnitude/rescale pruning is the opaque op nmsparse::prune_grad_cpu, which runs
    the kernel when the graph runs: same input gradient as eager."""
    import copy

    from nmsparse.nn.sdgp import SDGPConv2d

    torch.manual_seed(0)
    net = torch.nn.Sequential(SDGPConv2d(8, 16, 3, padding=1, n=2, m=4, method="rescale"), torch.nn.ReLU(),
                              SDGPConv2d(16, 16, 3, padding=1, n=2, m=4, method="rescale"))
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    net(x).square().sum().backward()
    eager = x.grad.clone()
    calls = []
    kernel = native.prune_grad_native
    monkeypatch.setattr(native, "prune_grad_native", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    x.grad = None
    torch.compile(copy.deepcopy(net), backend="aot_eager")(x).square().sum().backward()
    assert calls, "the compiled backward should run the kernel"
    torch.testing.assert_close(x.grad, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 3, 8, 9, 16, 75, 127])
def test_float_rows_of_groups_of_four_equal_the_torch_path(n, groups):
    """float32 n:4 along contiguous rows (a Linear weight's mask, a Linear gradient's magnitude or rescale prune, a 3x3
    conv weight's mask through a copy) takes its own vector path on AVX2: the same keep rule (ties to the earlier
    entry, NaN as the largest, -0.0 as 0) and values."""
    gen = torch.Generator().manual_seed(groups * 10 + n)
    g = torch.randn(7, 5, 4 * groups, generator=gen)
    g[0, 0, :4] = 1.5  # a whole group tied
    g[0, 1, :4] = torch.tensor([-0.0, 0.0, 0.0, -0.0])
    g[1, 0, :4] = torch.tensor([math.nan, 1.0, math.nan, -2.0])
    g[1, 1, :4] = torch.tensor([math.inf, -math.inf, 3.0, math.inf])
    g[2, 2, :4] = torch.tensor([2.0, -2.0, 1.0, 2.0])  # |x| ties across signs
    g[3] = g[3].round()  # many ties
    for method in ("magnitude", "rescale", "random", "random-unbiased", "mvue"):  # rescale: then each plane's scale
        ref, out = _both(g, n, 4, method, 2)
        _agree(ref, out, method, 4, g.dtype)
        assert torch.equal(ref.isnan(), out.isnan())
    ref, out = _both(g[0], n, 4, "rescale", 1)  # a 2-D gradient: one scale per sample's row
    _agree(ref, out, "rescale", 4, g.dtype)
    mask = native.nm_mask_native(g, n, 4, 2)
    assert torch.equal(mask, nm_mask(g, n, 4, dim=2)) and is_nm(mask, n, 4, dim=2)
    w = g.reshape(-1, 4 * groups)  # a Linear weight (out, in)
    assert torch.equal(native.nm_mask_native(w, n, 4, 1), nm_mask(w, n, 4, dim=1))
    conv = g.reshape(5, 7, 4 * groups).permute(0, 2, 1).reshape(5, 4 * groups, 7, 1)[:, :, :6].reshape(5, 4 * groups,
                                                                                                   3, 2)
    got = native.nm_mask_native(conv, n, 4, 1)
    assert got.is_contiguous() and torch.equal(got, nm_mask(conv, n, 4, dim=1))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_property_rows_of_four(n, rows, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randint(-3, 4, (rows, 4 * groups), generator=gen).float()  # small integers: ties everywhere
    for method in ("magnitude", "random", "random-unbiased", "mvue"):
        ref, out = _both(g, n, 4, method, 1, seed)
        assert torch.equal(ref, out)
    assert torch.equal(native.nm_mask_native(g, n, 4, 1), nm_mask(g, n, 4, dim=1))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("positions", [(2, 4), (4, 4), (4, 6), (8, 8), (8, 9), (8, 15), (5, 40)])
def test_float_planes_of_groups_of_four_equal_the_torch_path(n, positions):
    """float32 n:4 across channels a plane apart with whole vectors of contiguous positions (an NCHW conv gradient)
    takes its own vector path on AVX2: the tile path's keep rule and values, for every method; positions from 8 to
    200 cover mvue's blocks of 8, 4, 2 and 1 vectors."""
    h, w = positions
    gen = torch.Generator().manual_seed(h * 100 + w * 10 + n)
    g = torch.randn(3, 12, h, w, generator=gen)
    g[0, :4, 0, 0] = 1.5  # a whole group tied
    g[0, 4:8, 0, 1] = torch.tensor([-0.0, 0.0, 0.0, -0.0])
    g[1, :4, 1, 0] = torch.tensor([math.nan, 1.0, math.nan, -2.0])
    g[1, 4:8, 1, 1] = torch.tensor([math.inf, -math.inf, 3.0, math.inf])
    g[2, 8:12, 0, 0] = torch.tensor([2.0, -2.0, 1.0, 2.0])  # |x| ties across signs
    g[2, :, 1] = g[2, :, 1].round()  # many ties
    g[0, 8:12, 1] = 0  # planes with fewer than n nonzeros
    for method in METHODS:
        ref, out = _both(g, n, 4, method, 1)
        _agree(ref, out, method, 4, g.dtype)
        assert torch.equal(ref.isnan(), out.isnan())
        if method != "rescale":
            _same_bits(ref, out)
    five = g.reshape(3, 2, 6, h, w)  # channels at dim 2 with a dim before them: O = 2
    for method in METHODS:
        ref, out = _both(five[:, :, :4].contiguous(), n, 4, method, 2)
        _agree(ref, out, method, 4, g.dtype)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_property_planes_of_four(n, batch, groups, vectors, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randint(-3, 4, (batch, 4 * groups, 8 * vectors), generator=gen).float()  # ties everywhere
    for method in ("magnitude", "random", "random-unbiased", "mvue"):
        ref, out = _both(g, n, 4, method, 1, seed)
        assert torch.equal(ref, out)
    ref, out = _both(g, n, 4, "rescale", 1, seed)
    _agree(ref, out, "rescale", 4, g.dtype)
