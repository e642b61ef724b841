"""The opaque ops that compiled graphs use for W * mask and SR-STE's backward on 2-D CPU weights."""

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch._dynamo.utils import counters

import nmsparse
from nmsparse.kernels import compiled_masking as cm
from nmsparse.kernels.native_prune import native_prune_available, native_prune_error


def operands(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return w, torch.rand(shape, generator=g) < 0.5, torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), dtype=st.sampled_from([torch.float32, torch.float64,
                                                                                torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**31 - 1))
def test_ops_equal_the_torch_expressions(rows, cols, dtype, seed):
    w, mask, grad = operands((rows, cols), dtype, seed)
    assert torch.equal(cm.masked_weight_op(w, mask), w * mask)
    want = grad + 2e-4 * w.masked_fill(mask, 0)
    assert torch.equal(cm.srste_grad_op(grad, w, mask, 2e-4), want)


def test_the_ops_run_the_kernel_where_it_is_built(monkeypatch):
    if not native_prune_available():
        pytest.skip(f"no C++ build here: {native_prune_error()}")
    calls = []
    for name in ("masked_weight_native", "srste_grad_native"):
        real = getattr(cm, name)
        monkeypatch.setattr(cm, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    w, mask, grad = operands((8, 16), torch.float32, 4)
    cm.masked_weight_op(w, mask), cm.srste_grad_op(grad, w, mask, 2e-4)
    assert calls == ["masked_weight_native", "srste_grad_native"]


def test_bad_operands_are_named():
    w, mask, grad = operands((8, 16), torch.float32, 5)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        cm.masked_weight_op(w, mask.float())
    with pytest.raises(ValueError, match=r"w of shape \(1, 16\) does not match the mask's \(8, 16\)"):
        cm.masked_weight_op(w[:1], mask)
    with pytest.raises(ValueError, match="w is torch.bfloat16, grad is torch.float32"):
        cm.srste_grad_op(grad, w.bfloat16(), mask, 2e-4)


def test_export_keeps_plain_torch_ops():
    """torch.export traces like torch.compile, but an exported program must not need nmsparse's ops to load."""
    model = nmsparse.sparsify(MLP(), nmsparse.SparsityConfig(weight=nmsparse.WeightNM(2, 4, method="fixed")))
    model(torch.randn(2, 16))  # the masks are set up
    graph = str(torch.export.export(model.eval(), (torch.randn(2, 16),)).graph)
    assert "nmsparse" not in graph and "aten.mul" in graph


def test_srste_backward_records_a_graph_for_double_backward():
    layer = nmsparse.sparsify(nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4)),
                              nmsparse.SparsityConfig(weight=nmsparse.WeightNM(2, 4)))
    w = layer[0].parametrizations.weight.original
    (g,) = torch.autograd.grad(layer(torch.randn(3, 16)).square().sum(), w, create_graph=True)
    assert g.requires_grad and g.grad_fn is not None


def test_the_product_is_differentiable_with_the_masked_gradient():
    w, mask, grad = operands((24, 40), torch.float64, 0)
    w.requires_grad_(True)
    cm.masked_weight_op(w, mask).backward(grad)
    assert torch.equal(w.grad, grad * mask)
    torch.autograd.gradcheck(lambda x: cm.masked_weight_op(x, mask), (w.detach().clone().requires_grad_(True),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    w, mask, grad = operands((16, 32), dtype, 1)
    torch.library.opcheck(cm.masked_weight_op, (w.requires_grad_(True), mask))
    torch.library.opcheck(cm.srste_grad_op, (grad, w.detach(), mask, 2e-4))


def test_which_operands_take_the_op():
    w, mask, _ = operands((8, 16), torch.float32, 2)
    assert cm.compiled_op_takes(w, mask)
    assert not cm.compiled_op_takes(w.t(), mask.t())  # not contiguous
    assert not cm.compiled_op_takes(w, mask.float())  # not a bool mask
    assert not cm.compiled_op_takes(w.reshape(8, 4, 2, 2), mask.reshape(8, 4, 2, 2))  # a conv weight: inductor's layout
    assert not cm.compiled_op_takes(w.to(torch.int32), mask)


class MLP(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fixed", "srste"])
def test_a_compiled_model_runs_the_kernel_in_one_graph_with_eager_losses(method, monkeypatch):
    calls = {"masked_weight": 0, "srste_grad": 0}
    for name in calls:
        real = getattr(cm, f"{name}_native")

        def spy(*args, real=real, name=name):
            calls[name] += 1
            return real(*args)

        monkeypatch.setattr(cm, f"{name}_native", spy)
    torch.manual_seed(0)
    eager = nmsparse.sparsify(MLP(), nmsparse.SparsityConfig(weight=nmsparse.WeightNM(2, 4, method=method)))
    model = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model)
    losses = []
    for net, params in ((eager, eager), (compiled, model)):
        opt = torch.optim.SGD(params.parameters(), lr=0.1)
        nmsparse.attach(params, opt)
        run = []
        for step in range(4):
            x = torch.randn(8, 16, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            loss = net(x).square().mean()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert counters["frames"]["total"] == 1 and not counters["graph_break"]
    # 2 of the 3 Linear layers are sparse (the default filter leaves the output layer dense), 4 compiled steps: the
    # forward product, and the backward's grad * mask (fixed) or SR-STE's gradient, each through an op per layer
    # (the eager steps call the kernel directly, not through the ops)
    assert calls == ({"masked_weight": 16, "srste_grad": 0} if method == "fixed" else
                     {"masked_weight": 8, "srste_grad": 8})
