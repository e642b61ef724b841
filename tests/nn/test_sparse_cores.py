"""The sparse-core Linear (sparsify with WeightNM(kernel="auto")): on a CPU it computes exactly what
kernel="dense" computes; at the dispatch boundary, with the Dispatcher's decision forced to sparse,
the forward and (transposable) backward-data products go to kernels.ops with the right compressed
operands; config, state_dict and squash; on an sm80+ GPU the sparse-core result matches dense."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nmsparse import GradSparsity, SparsityConfig, WeightNM, sparsify, sparsity_report, squash
from nmsparse.kernels import dispatch, ops
from nmsparse.kernels import semi_structured as ss
from nmsparse.kernels.dispatch import Dispatcher
from nmsparse.nn.sdgp import SDGPLinear, prune_grad
from nmsparse.nn.sparse_cores import (SparseCoreLinear, SparseCoreSDGPLinear, sparse_core_eligible,
                                      to_sparse_core)
from nmsparse.patterns.nm import is_nm
from nmsparse.patterns.transposable import is_transposable


class MLP(nn.Module):
    def __init__(self, d=64, h=128, classes=10):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, d)
        self.odd, self.head = nn.Linear(d, 20), nn.Linear(20, classes)  # 20: not a sparse-core shape

    def forward(self, x):
        return self.head(self.odd(self.fc2(F.gelu(self.fc1(x)))))


def config(kernel, transposable=True, grad=None):
    return SparsityConfig(weight=WeightNM(2, 4, transposable=transposable, kernel=kernel),
                          grad=GradSparsity(2, 4, method=grad, layers="conv+linear") if grad else None,
                          on_incompatible="skip" if grad else "error")


def pair(transposable=True, grad=None, dtype=torch.float32):
    torch.manual_seed(0)
    base = MLP().to(dtype)
    auto, dense = copy.deepcopy(base), copy.deepcopy(base)
    sparsify(auto, config("auto", transposable, grad))
    sparsify(dense, config("dense", transposable, grad))
    return auto, dense


def grads(model, x, gy=None):
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(gy if gy is not None else torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y))
    return y.detach(), x.grad, {k: p.grad.clone() for k, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------------
# CPU: exactly the dense masked Linear

@pytest.mark.parametrize("transposable", [True, False])
@pytest.mark.parametrize("grad", [None, "rescale", "tile24"])
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (128, 64)), (torch.bfloat16, (2, 64, 64)),
                                         (torch.float64, (3, 64))])
def test_cpu_equals_the_dense_masked_linear(transposable, grad, dtype, shape):
    auto, dense = pair(transposable, grad, dtype)
    want_cls = SparseCoreSDGPLinear if grad else SparseCoreLinear
    assert type(auto.fc1).__name__ == f"Parametrized{want_cls.__name__}" and isinstance(auto.fc1, want_cls)
    assert isinstance(auto.fc1, nn.Linear) and isinstance(auto.fc1, SparseCoreLinear)
    assert grad is None or isinstance(auto.fc1, SDGPLinear)
    assert not isinstance(auto.odd, SparseCoreLinear) and not isinstance(auto.head, SparseCoreLinear)
    x = torch.randn(shape, dtype=dtype)
    for _ in range(3):  # training steps: masks and step counters move alike
        ya, gxa, gpa = grads(auto, x)
        yd, gxd, gpd = grads(dense, x)
        assert torch.equal(ya, yd) and torch.equal(gxa, gxd)
        assert gpa.keys() == gpd.keys() and all(torch.equal(gpa[k], gpd[k]) for k in gpa)
        auto.zero_grad(), dense.zero_grad()
    assert auto.state_dict().keys() == dense.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), dense.state_dict().values()))
    with torch.no_grad():
        assert torch.equal(auto.eval()(x), dense.eval()(x))


def test_cpu_autocast_equals_dense():
    auto, dense = pair()
    x = torch.randn(64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, gxa, _ = grads(auto, x)
        yd, gxd, _ = grads(dense, x)
    assert ya.dtype == torch.bfloat16 and torch.equal(ya, yd) and torch.equal(gxa, gxd)


# ------------------------------------------------------------------------------------------------
# The dispatch boundary, decision forced to sparse (2:4 compression replaced by a recording copy)

@pytest.fixture
def forced(monkeypatch):
    """Sparse cores 'available' for any tensor; to_sparse_24 records its operand and returns it
    dense; a Dispatcher whose timer says sparse is faster (its result check still runs)."""
    calls = []

    def fake_compress(t, backend="auto"):
        calls.append(t.detach().clone())
        return t.detach().clone()

    monkeypatch.setattr(ops, "weight24_applies", lambda a, w: True)
    monkeypatch.setattr(ss, "to_sparse_24", fake_compress)
    disp = Dispatcher(timer=lambda dense_fn, sparse_fn: (2.0, 1.0))
    monkeypatch.setattr(dispatch, "_default", disp)
    return calls, disp


def _masked(layer):
    return layer.weight.detach().clone()


@pytest.mark.parametrize("transposable", [True, False])
def test_forced_sparse_routes_compress_w_and_w_transposed(forced, transposable):
    calls, disp = forced
    auto, dense = pair(transposable)
    x = torch.randn(128, 64)
    ya, gxa, gpa = grads(auto, x)
    yd, gxd, gpd = grads(dense, x)
    torch.testing.assert_close(ya, yd)
    torch.testing.assert_close(gxa, gxd)
    for k in gpa:
        torch.testing.assert_close(gpa[k], gpd[k])
    w1, w2 = _masked(auto.fc1), _masked(auto.fc2)
    assert is_nm(w1, 2, 4, dim=1) and (not transposable or is_transposable(w1, 2, 4))
    ops_seen = sorted({r["op"] for r in disp.report()})
    assert all(r["choice"] == "sparse" for r in disp.report())
    if transposable:
        assert ops_seen == ["w24_linear", "w24t_linear_dx"]
        # per product: the Dispatcher's check runs sparse_fn once, then the chosen route once more;
        # forward fc1, fc2 (W), then backward fc2, fc1 (W^T, contiguous)
        assert [tuple(c.shape) for c in calls] == [(128, 64)] * 2 + [(64, 128)] * 2 + [(128, 64)] * 2 \
            + [(64, 128)] * 2
        fwd = [c for c in calls if any(torch.equal(c, w) for w in (w1, w2))]
        bwd = [c for c in calls if any(torch.equal(c, w.t()) for w in (w1, w2))]
        assert len(fwd) == 4 and len(bwd) == 4 and all(c.is_contiguous() for c in calls)
        assert any(torch.equal(c, w2.t()) for c in bwd) and any(torch.equal(c, w1.t()) for c in bwd)
    else:  # a plain 2:4 mask: W^T is not 2:4 along its rows, so the backward-data product stays dense
        assert ops_seen == ["w24_linear"]
        assert len(calls) == 4 and all(any(torch.equal(c, w) for w in (w1, w2)) for c in calls)
    keys = {r["shape"] for r in disp.report()}
    assert "128x64x128" in keys and "128x128x64" in keys


def test_forced_sparse_takes_strided_inputs_and_gradients(forced):
    """A 3-D, non-contiguous input and an expanded output gradient (from .sum())."""
    calls, disp = forced
    auto, dense = pair()
    base = torch.randn(2, 64, 96)
    outs = []
    for model in (auto, dense):
        x = base[:, :, 16:80].detach().requires_grad_()
        assert not x.is_contiguous()
        model(x).sum().backward()
        outs.append((x.grad, model.fc1.parametrizations.weight.original.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])
    assert {r["op"] for r in disp.report() if r["choice"] == "sparse"} == {"w24_linear", "w24t_linear_dx"}


def test_forced_sparse_with_sdgp_uses_sdgp_for_the_input_gradient(forced, monkeypatch):
    calls, disp = forced
    seen = []
    real = ops.sdgp_linear_dx

    def fake_sdgp(gy, weight, n, m, method, generator=None, **kw):
        seen.append((tuple(gy.shape), tuple(weight.shape), n, m, method))
        return real(gy, weight, n, m, method, generator, **kw)  # None on a CPU: the dense SDGP product

    monkeypatch.setattr(ops, "sdgp_linear_dx", fake_sdgp)
    auto, dense = pair(True, "magnitude")
    x = torch.randn(64, 64)
    ya, gxa, _ = grads(auto, x)
    # fc1, fc2 (sparse-core SDGP layers) and odd (a plain SDGPLinear) ask SDGP's op for dX
    assert sorted(seen) == [((64, 20), (20, 64), 2, 4, "magnitude"), ((64, 64), (64, 128), 2, 4, "magnitude"),
                            ((64, 128), (128, 64), 2, 4, "magnitude")]
    yd, gxd, _ = grads(dense, x)
    torch.testing.assert_close(ya, yd)
    torch.testing.assert_close(gxa, gxd)
    assert {r["op"] for r in disp.report()} == {"w24_linear"}  # no dY @ W^T route: SDGP decides dX
    # and the dX is SDGP's: the pruned output gradient times the masked weight
    gy = torch.randn(64, 64)
    lin = auto.fc2
    xi = torch.randn(64, 128, requires_grad=True)
    lin(xi).backward(gy)
    torch.testing.assert_close(xi.grad, prune_grad(gy, 2, 4, "magnitude", -1) @ _masked(lin))


def test_forced_dense_decision_runs_dense(monkeypatch):
    monkeypatch.setattr(ops, "weight24_applies", lambda a, w: True)
    monkeypatch.setattr(ss, "to_sparse_24", lambda t, backend="auto": t.detach().clone() * 2)  # a wrong result
    disp = Dispatcher(timer=lambda dense_fn, sparse_fn: (2.0, 1.0))
    monkeypatch.setattr(dispatch, "_default", disp)
    auto, dense = pair()
    x = torch.randn(64, 64)
    ya, gxa, _ = grads(auto, x)
    yd, gxd, _ = grads(dense, x)
    torch.testing.assert_close(ya, yd)
    torch.testing.assert_close(gxa, gxd)
    assert disp.report() and all(r["choice"] == "dense" and "differs" in r["reason"] for r in disp.report())


def test_ops_weight24_are_none_on_cpu():
    x, w = torch.randn(64, 64, dtype=torch.float16), torch.randn(128, 64, dtype=torch.float16)
    assert not ops.weight24_applies(x, w)
    assert ops.weight24_linear(x, w) is None
    assert ops.weight24_linear_dx(torch.randn(64, 128, dtype=torch.float16), w) is None


# ------------------------------------------------------------------------------------------------
# Config, conversion, state_dict, squash

def test_kernel_field_is_validated():
    assert WeightNM().kernel == "dense"
    with pytest.raises(ValueError, match="weight.kernel must be 'dense'.*or 'auto'.*'gpu'"):
        WeightNM(kernel="gpu")
    with pytest.raises(ValueError, match="kernel must be"):
        WeightNM(kernel=None)
    with pytest.raises(ValueError, match="take only 2:4; got 4:8"):
        WeightNM(4, 8, kernel="auto")
    with pytest.raises(ValueError, match="weight.kernel"):
        SparsityConfig.from_dict({"weight": {"kind": "nm", "kernel": "fast"}})
    cfg = SparsityConfig.from_dict({"weight": {"kind": "nm", "transposable": True, "kernel": "auto"}})
    assert cfg.weight.kernel == "auto" and SparsityConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["weight"]["kernel"] == "auto"


def test_state_dict_keys_equal_a_plain_sparsified_linear():
    for grad in (None, "rescale"):
        auto, dense = pair(True, grad)
        assert list(auto.state_dict()) == list(dense.state_dict())
        buf = io.BytesIO()
        torch.save(dense.state_dict(), buf)
        buf.seek(0)
        auto.load_state_dict(torch.load(buf))
        dense.load_state_dict(auto.state_dict())


def test_squash_gives_plain_linears_with_the_masked_weight():
    for grad in (None, "rescale"):
        auto, _ = pair(True, grad)
        x = torch.randn(64, 64)
        grads(auto, x)
        masked = {n: m.weight.detach().clone() for n, m in auto.named_modules() if isinstance(m, nn.Linear)}
        with torch.no_grad():
            y = auto.eval()(x)
        squash(auto)
        for name, mod in auto.named_modules():
            if isinstance(mod, nn.Linear):
                assert type(mod) is nn.Linear and torch.equal(mod.weight, masked[name])
        with torch.no_grad():
            assert torch.equal(auto(x), y)
        assert sparsity_report(auto) == []


def test_report_names_the_sparse_core_layers_and_copies_work():
    auto, _ = pair()
    types = {r["layer"]: r["type"] for r in sparsity_report(auto)}
    assert types == {"fc1": "SparseCoreLinear", "fc2": "SparseCoreLinear", "odd": "Linear"}
    clone = copy.deepcopy(auto)
    x = torch.randn(64, 64)
    assert torch.equal(grads(clone, x)[1], grads(auto, x)[1])


def test_conversion_rules():
    assert sparse_core_eligible(nn.Linear(64, 128)) and sparse_core_eligible(SDGPLinear(64, 128))
    assert not sparse_core_eligible(nn.Linear(64, 20)) and not sparse_core_eligible(nn.Linear(20, 64))
    assert not sparse_core_eligible(nn.Conv2d(64, 64, 1))
    assert not sparse_core_eligible(nn.modules.linear.NonDynamicallyQuantizableLinear(64, 64))
    lin = nn.Linear(64, 64)
    sc = to_sparse_core(lin)
    assert type(sc) is SparseCoreLinear and sc.weight is lin.weight and sc.bias is lin.bias
    assert to_sparse_core(sc) is sc
    sd = SDGPLinear(64, 64, method="random", seed=3)
    both = to_sparse_core(sd)
    assert type(both) is SparseCoreSDGPLinear and both.weight is sd.weight and both.sdgp_step is sd.sdgp_step
    assert (both.n, both.m, both.method, both.seed) == (2, 4, "random", 3)
    assert type(both.to_dense()) is nn.Linear and type(sc.to_dense()) is nn.Linear
    # without a 2:4 parametrization it is a plain Linear
    x = torch.randn(8, 64)
    assert torch.equal(sc(x), F.linear(x, lin.weight, lin.bias))
    with pytest.raises(TypeError):
        SparseCoreLinear.from_dense(nn.Conv2d(4, 4, 1))


def test_other_weight_patterns_run_dense(forced):
    """Only a 2:4 NMWeightSparsity goes to the sparse cores; a block or 4:8 mask runs F.linear."""
    from nmsparse.nn.weight import BlockWeightSparsity, NMWeightSparsity, apply

    calls, disp = forced
    for p in (BlockWeightSparsity((8, 8), 0.5), NMWeightSparsity(4, 8), None):
        lin = to_sparse_core(nn.Linear(64, 64))
        if p is not None:
            apply(lin, p)
        x = torch.randn(64, 64)
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert calls == [] and disp.report() == []


# ------------------------------------------------------------------------------------------------
# GPU: the sparse cores themselves

@pytest.mark.gpu
@pytest.mark.skipif(not ss.is_available(), reason="needs an sm80+ NVIDIA GPU for 2:4 sparse tensor cores")
@pytest.mark.parametrize("grad", [None, "magnitude"])
def test_sparse_core_linear_matches_dense_on_gpu(monkeypatch, grad):
    disp = Dispatcher(timer=lambda dense_fn, sparse_fn: (2.0, 1.0))  # sparse wherever it agrees with dense
    monkeypatch.setattr(dispatch, "_default", disp)
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(512, 1024), nn.GELU(), nn.Linear(1024, 512), nn.Linear(512, 10))
    base = base.cuda().to(torch.bfloat16)
    auto, dense = copy.deepcopy(base), copy.deepcopy(base)
    grad_cfg = GradSparsity(2, 4, method=grad, layers="conv+linear") if grad else None
    sparsify(auto, SparsityConfig(weight=WeightNM(2, 4, transposable=True, kernel="auto"), grad=grad_cfg))
    sparsify(dense, SparsityConfig(weight=WeightNM(2, 4, transposable=True), grad=grad_cfg))
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(4, 256, 10, device="cuda", dtype=torch.bfloat16)  # not linspace: its bias sums cancel

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    def compare():
        (ya, gxa, gpa), (yd, gxd, gpd) = grads(auto, x, gy), grads(dense, x, gy)
        errs = {"y": rel(ya, yd), "dx": rel(gxa, gxd)} | {k: rel(gpa[k], gpd[k]) for k in gpa}
        assert all(e < 2e-2 for e in errs.values()), errs

    if grad is None:
        compare()
    else:
        # SDGP's magnitude pruning of dY flips near-ties under the sparse forward's bf16 rounding (on an H200: dX
        # 10% apart, each product exact alone), so the backward is compared with the forward product dense.
        ya, yd = auto(x), dense(x)
        assert rel(ya, yd) < 2e-2
        monkeypatch.setattr(ops, "weight24_linear", lambda *a, **k: None)
        compare()
    chosen = {r["op"]: r["choice"] for r in disp.report()}
    assert chosen.get("w24_linear") == "sparse", disp.report()
    assert chosen.get("w24t_linear_dx" if grad is None else "sdgp_dx_magnitude") == "sparse", disp.report()
