"""Block-sparse CPU execution equals the dense-with-zeros computation (float32 reassociation: rtol 1e-4).

The native kernel is compiled on first use (tens of seconds once; cached under
~/.cache/torch_extensions); where it cannot be built its tests are skipped and the torch
backend still runs.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

from nmsparse.compile import compile_model
from nmsparse.prune import prune_blocks
from nmsparse.compile.runtime import BlockSparseConv2d, BlockSparseLinear, alternating_timer, build_executable
from nmsparse.kernels import block_cpu as bc

TOL = dict(rtol=1e-4, atol=1e-4)  # unit-scale data; float32 sums in another order than oneDNN/MKL


def _native_or_skip():
    if not bc.native_available():
        pytest.skip(f"native block kernel unavailable: {bc.native_error()}")


@pytest.fixture(params=["torch", "native"])
def backend(request):
    if request.param == "native":
        _native_or_skip()
    return request.param


@pytest.fixture(params=["torch", "native", "native-panel"])
def conv_path(request):
    """(backend, direct): the native kernel's direct path and its im2col-panel path."""
    if request.param != "torch":
        _native_or_skip()
    return ("torch", True) if request.param == "torch" else ("native", request.param == "native")


def block_sparse(shape, density, g):
    w = torch.randn(shape, generator=g)
    keep = torch.rand(shape[0] // 8, shape[1] // 8, generator=g) < density
    m = keep.repeat_interleave(8, 0).repeat_interleave(8, 1)
    return w * m.view(m.shape + (1,) * (len(shape) - 2))


CONV_CASES = [  # (batch, ci, co, kernel, size, stride, padding, dilation)
    (1, 16, 24, 3, 9, 1, 1, 1),
    (2, 8, 16, 3, 10, 2, 1, 1),
    (1, 24, 8, 5, 11, 2, 2, 1),
    (3, 16, 16, 3, 12, 1, 2, 2),
    (1, 32, 64, 1, 7, 1, 0, 1),
    (1, 32, 64, 1, 8, 2, 0, 1),
    (2, 40, 32, (1, 7), (17, 13), 1, (0, 3), 1),
    (1, 16, 16, 3, 7, 1, 0, 1),
    (1, 64, 32, 3, 4, 1, 1, 1),
    (2, 8, 16, 3, 15, 3, 2, 2),  # stride 3 with dilation 2: taps fall in all 9 stride phases
    (1, 16, 8, 3, (9, 21), (2, 1), (1, 0), (1, 3)),  # asymmetric stride, padding, dilation
    (1, 8, 16, 1, 9, 2, 1, 1),  # strided 1x1 with padding: a single phase, zero border
    (2, 16, 16, 3, 50, 1, 1, 1),  # rows wider than a chunk: chunks end mid-row and at the wrap
    (1, 8, 8, 2, 5, 1, 3, 1),  # padding larger than the kernel
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c[:5])))
@pytest.mark.parametrize("density", [0.0, 0.3, 0.5, 1.0])
def test_conv_matches_dense(case, density, conv_path):
    backend, direct = conv_path
    b, ci, co, k, hw, s, p, d = case
    g = torch.Generator().manual_seed(hash((case, density)) % 2**31)
    kh, kw = (k, k) if isinstance(k, int) else k
    h, w = (hw, hw) if isinstance(hw, int) else hw
    x = torch.randn(b, ci, h, w, generator=g)
    wt = block_sparse((co, ci, kh, kw), density, g)
    bias = torch.randn(co, generator=g)
    mat = bc.BlockSparseMatrix.from_weight(wt)
    assert mat.nnzb == int((wt.reshape(co, -1).reshape(co // 8, 8, -1, 8).abs().sum((1, 3)) > 0).sum())
    for bb in (bias, None):
        got = bc.block_sparse_conv2d(x, mat, (kh, kw), bb, s, p, d, backend=backend, direct=direct)
        torch.testing.assert_close(got, F.conv2d(x, wt, bb, s, p, d), **TOL)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(b=st.integers(1, 3), ci=st.sampled_from([8, 16, 24]), co=st.sampled_from([8, 16]),
       kh=st.integers(1, 4), kw=st.integers(1, 4), h=st.integers(1, 23), w=st.integers(1, 70),
       sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 3), pw=st.integers(0, 3),
       dh=st.integers(1, 3), dw=st.integers(1, 3), density=st.sampled_from([0.2, 0.6, 1.0]),
       threads=st.sampled_from([1, 2]), seed=st.integers(0, 2**31 - 1))
def test_native_conv_any_geometry(b, ci, co, kh, kw, h, w, sh, sw, ph, pw, dh, dw, density, threads, seed):
    """Both native paths equal F.conv2d for any stride / padding / dilation / size that has an output."""
    _native_or_skip()
    if (h + 2 * ph - dh * (kh - 1) - 1) < 0 or (w + 2 * pw - dw * (kw - 1) - 1) < 0:
        return
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, ci, h, w, generator=g)
    wt = block_sparse((co, ci, kh, kw), density, g)
    bias = torch.randn(co, generator=g)
    mat = bc.BlockSparseMatrix.from_weight(wt)
    want = F.conv2d(x, wt, bias, (sh, sw), (ph, pw), (dh, dw))
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for direct in (True, False):
            got = bc.block_sparse_conv2d(x, mat, (kh, kw), bias, (sh, sw), (ph, pw), (dh, dw), backend="native",
                                         direct=direct)
            torch.testing.assert_close(got, want, **TOL)
    finally:
        torch.set_num_threads(old)


def test_native_padded_buffer_is_rewritten_between_calls():
    """The direct path keeps its padded-input buffer across calls: a smaller input after a larger one
    (and a larger one after that) must see zeros where the padding is, not the previous call's data."""
    _native_or_skip()
    g = torch.Generator().manual_seed(5)
    wt = block_sparse((16, 8, 3, 3), 1.0, g)
    mat = bc.BlockSparseMatrix.from_weight(wt)
    for size, pad in ((40, 1), (9, 2), (41, 3), (5, 1)):
        x = torch.randn(2, 8, size, size, generator=g) * 100
        torch.testing.assert_close(bc.block_sparse_conv2d(x, mat, 3, None, 1, pad, backend="native"),
                                   F.conv2d(x, wt, None, 1, pad), rtol=1e-4, atol=1e-2)


def test_direct_geometry_counts():
    geo = bc.direct_geometry(16, 10, 10, 3, 1, 1)
    assert (geo["h_out"], geo["w_out"], geo["grid_w"], geo["lanes"]) == (10, 10, 12, 9 * 12 + 10)
    assert (geo["copy_floats"], geo["rows"], geo["span"], geo["plain"]) == (16 * 12 * 12, 16 * 3, 50, False)
    one = bc.direct_geometry(32, 7, 7, 1)  # plain 1x1 reads x: nothing copied, one row per channel
    assert (one["copy_floats"], one["rows"], one["lanes"], one["plain"]) == (0, 32, 49, True)
    s2 = bc.direct_geometry(8, 9, 9, 3, 2, 1)  # 4 phases; rows: (phase row, offset) pairs 0/0, 1/0, 0/1
    assert (s2["h_out"], s2["w_out"], s2["phases"], s2["grid_w"]) == (5, 5, 4, 6)
    assert s2["copy_floats"] == 8 * 4 * 6 * 6 and s2["rows"] == 8 * 6 and s2["span"] == 49


@pytest.mark.parametrize("rows", [1, 3, 7, 8, 16, 50])
@pytest.mark.parametrize("density", [0.0, 0.25, 0.75, 1.0])
def test_linear_matches_dense(rows, density, backend):
    g = torch.Generator().manual_seed(rows * 100 + int(density * 10))
    w = block_sparse((48, 64), density, g)
    x = torch.randn(rows, 64, generator=g)
    bias = torch.randn(48, generator=g)
    mat = bc.BlockSparseMatrix.from_weight(w)
    torch.testing.assert_close(bc.block_sparse_linear(x, mat, bias, backend=backend), F.linear(x, w, bias), **TOL)
    x3 = torch.randn(2, rows, 64, generator=g)  # leading dims are kept
    torch.testing.assert_close(bc.block_sparse_linear(x3, mat, None, backend=backend), F.linear(x3, w), **TOL)


def test_matrix_round_trip_and_matmul(backend):
    g = torch.Generator().manual_seed(3)
    w = block_sparse((32, 40), 0.5, g)
    mat = bc.BlockSparseMatrix.from_dense(w)
    assert torch.equal(mat.to_dense(), w)
    assert mat.density == pytest.approx(mat.nnzb / 20)
    x = torch.randn(40, 33, generator=g)
    torch.testing.assert_close(bc.bsr_matmul(mat, x, backend=backend), w @ x, **TOL)


def test_modules_and_dense_paths():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    lin = nn.Linear(64, 16)
    with torch.no_grad():
        conv.weight.copy_(block_sparse(tuple(conv.weight.shape), 0.5, g))
        lin.weight.copy_(block_sparse(tuple(lin.weight.shape), 0.5, g))
    sc, sl = BlockSparseConv2d(conv), BlockSparseLinear(lin)
    x = torch.randn(2, 16, 9, 9, generator=g)
    y = torch.randn(5, 64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(sc(x), conv(x), **TOL)
        torch.testing.assert_close(sl(y), lin(y), **TOL)
        # other dtypes run the dense weight rebuilt from the blocks
        torch.testing.assert_close(sc(x.double()), conv.double()(x.double()), rtol=1e-10, atol=1e-10)
        conv.float()
    xg = x.clone().requires_grad_(True)
    out = sc(xg)  # inputs needing gradients take the dense path (the kernel has no backward)
    out.sum().backward()
    assert xg.grad is not None and xg.grad.shape == x.shape


def test_input_errors():
    mat = bc.BlockSparseMatrix.from_weight(torch.ones(8, 16, 3, 3))
    with pytest.raises(TypeError, match="float32 CPU"):
        bc.block_sparse_conv2d(torch.ones(1, 16, 5, 5, dtype=torch.float64), mat, 3)
    with pytest.raises(ValueError, match="x has 8 channels but the weight takes 16"):
        bc.block_sparse_conv2d(torch.ones(1, 8, 5, 5), mat, 3)
    with pytest.raises(ValueError, match="too small"):
        bc.block_sparse_conv2d(torch.ones(1, 16, 2, 2), mat, 3)
    with pytest.raises(ValueError, match="not divisible into 8x8 blocks"):
        bc.BlockSparseMatrix.from_dense(torch.ones(12, 16))
    with pytest.raises(ValueError, match="backend must be one of"):
        bc.resolve_backend("cuda")


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.c3 = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32 * 6 * 6, 16)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.bn(self.c2(x)))
        return self.fc(torch.relu(self.c3(x)).flatten(1))


@pytest.mark.parametrize("sparsity", [0.5, 0.75])
def test_compiled_model_equals_dense_model(sparsity, backend):
    torch.manual_seed(1)
    net = SmallNet().eval()
    prune_blocks(net, sparsity)
    c = compile_model(net, "cpu", (2, 3, 12, 12), timer=lambda fns: [2.0, 1.0])  # keep every sparse layer
    assert set(c.sparse_layers) == {"c2", "c3", "fc"}
    exe = build_executable(c.model, c.sparse_layers, backend)
    assert sum(isinstance(m, (BlockSparseConv2d, BlockSparseLinear)) for m in exe.modules()) == 3
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(exe(x), net(x), **TOL)


def test_measured_fallback_runs_on_real_timer():
    """The real (unmocked) decision returns sane timings for a layer."""
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1).eval()
    with torch.no_grad():
        conv.weight.mul_(0)
    sparse = BlockSparseConv2d(conv, "torch")
    x = torch.randn(1, 16, 8, 8)
    td, ts = alternating_timer([lambda: conv(x), lambda: sparse(x)], repeats=3, budget_s=0.1)
    assert td > 0 and ts > 0
