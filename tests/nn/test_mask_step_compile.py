"""torch.compile of attached sparsified models: one graph, no recompiles after the first steps, the masks and losses
of eager training, SDGP's random methods included (their key is traced on the CPU)."""

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse.nn.sparsify import sparse_layers

dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402


class TinyCNN(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 10))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc, self.proj = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.proj(nn.functional.gelu(self.fc(self.norm(x))))


class TinyGPTStack(nn.Module):
    """Token embedding, two residual MLP blocks, a head: the Linear layers of a GPT without attention."""

    def __init__(self, vocab=16, d=16):
        super().__init__()
        self.embed, self.blocks = nn.Embedding(vocab, d), nn.Sequential(Block(d), Block(d))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(self.norm(self.blocks(self.embed(tokens))))


CASES = {
    # transposable masks recomputed every 2nd step, SDGP rescale on the conv gradients
    "cnn": (TinyCNN, nmsparse.SparsityConfig(weight=nmsparse.WeightNM(2, 4, transposable=True, recompute_every=2),
                                             grad=nmsparse.GradSparsity(2, 4, "rescale"))),
    # SR-STE on the convs: under inductor the product and SR-STE's backward read the uint8 channels-last mask copy
    "cnn-srste": (TinyCNN, nmsparse.SparsityConfig(weight=nmsparse.WeightNM(2, 4))),
    # SR-STE on every Linear but the head, SDGP random (a traced key per backward on the CPU) on them too
    "gpt": (TinyGPTStack, nmsparse.SparsityConfig(weight=nmsparse.WeightNM(2, 4),
                                                  grad=nmsparse.GradSparsity(2, 4, "random", layers="conv+linear"))),
}


def batch(case, step):
    g = torch.Generator().manual_seed(step)
    if case.startswith("cnn"):
        return torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
    tokens = torch.randint(0, 16, (2, 5), generator=g)
    return tokens, tokens.roll(-1, 1)


def frames() -> tuple[int, int]:
    """(frames compiled, recompiles included; graph breaks) so far."""
    return counters["frames"]["total"], sum(counters["graph_break"].values())


def train(case, net, model, steps, device="cpu", dtype=torch.float64):
    """SGD with the masks attached to the optimizer; per step: the loss, the masks after it, (frames, breaks) so far."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    nmsparse.attach(model, opt)
    losses, masks, seen = [], [], []
    for step in range(steps):
        x, y = batch(case, step)
        x, y = x.to(device, dtype if x.is_floating_point() else None), y.to(device)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x).flatten(0, -2), y.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
        masks.append(nmsparse.weight_masks(model))
        seen.append(frames())
    return losses, masks, seen


def check(case, backend, steps=6, device="cpu", dtype=torch.float64, rtol=1e-9, atol=1e-12):
    dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cls, config = CASES[case]
    eager = nmsparse.sparsify(cls().to(device, dtype), config)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend=backend)
    want, want_masks, _ = train(case, eager, eager, steps, device, dtype)
    got, got_masks, seen = train(case, compiled, model, steps, device, dtype)
    assert seen[2] == seen[-1], f"compiled again or broke the graph again after the 3rd step: {seen}"
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    for step, (a, b) in enumerate(zip(got_masks, want_masks)):  # the masks changed on the same steps
        assert a.keys() == b.keys() and len(a) >= 2
        assert all(torch.equal(a[k], b[k]) for k in a), step
    assert any(not torch.equal(got_masks[0][k], got_masks[-1][k]) for k in got_masks[0]), "no mask ever changed"
    steps_seen = {int(p.step) for _, _, p, _ in sparse_layers(model) if p is not None}
    sdgp = [m for m in model.modules() if isinstance(m, (nmsparse.SDGPConv2d, nmsparse.SDGPLinear))]
    assert steps_seen == {steps} and (sdgp or config.grad is None) and all(int(m.sdgp_step) == steps for m in sdgp)
    return seen


@pytest.mark.slow
def test_compiled_cnn_one_graph_no_recompiles_eager_masks():
    seen = check("cnn", "aot_eager")
    assert seen[-1] == (1, 0), seen  # one frame, no graph break, compiled once


@pytest.mark.slow
def test_compiled_cnn_srste_inductor_matches_eager():
    seen = check("cnn-srste", "inductor")
    assert seen[-1] == (1, 0), seen


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_gpt_stack_random_sdgp_one_graph(backend):
    """SDGP random on the CPU: each backward's key comes from the layer's seed and step tensor through an opaque op
    in the graph (kernels.draws.step_key_advance) and the prune is an opaque op that reads it, so no graph break;
    the losses equal eager's, so every step drew the same choice."""
    seen = check("gpt", backend, steps=6 if backend == "aot_eager" else 4)
    assert seen[-1] == (1, 0), seen


@pytest.mark.parametrize("method", ["random", "mvue"])
def test_compiled_sdgp_random_two_forwards_before_the_backward(method):
    """Gradient accumulation over two forwards, then one backward: each backward draws its own step's choice, as in
    eager (the key is computed in the compiled forward and saved, not recomputed from the advanced counter)."""
    dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = nmsparse.SDGPLinear(8, 16, method=method, seed=3).double()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    xs = [torch.randn(5, 8, dtype=torch.float64) for _ in range(2)]
    gs = [torch.randn(5, 16, dtype=torch.float64) for _ in range(2)]
    grads = []
    for net in (eager, compiled):
        leaves = [x.clone().requires_grad_() for x in xs]
        sum((net(x) * g).sum() for x, g in zip(leaves, gs)).backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    assert int(model.sdgp_step) == int(eager.sdgp_step) == 2
    assert frames() == (1, 0)


@pytest.mark.parametrize("n, m", [(4, 4), (2, 64)])
def test_compiled_sdgp_random_beyond_the_kernel_stays_one_graph(n, m):
    """n == m (nothing to draw) and m above the C++ kernel's 32 (the keyed op runs the torch path): still one graph,
    eager's gradients."""
    dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = nmsparse.SDGPLinear(8, 2 * m, method="random", n=n, m=m, seed=1).double()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    x, g = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 2 * m, dtype=torch.float64)
    grads = []
    for net in (eager, compiled):
        leaf = x.clone().requires_grad_()
        (net(leaf) * g).sum().backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    assert frames() == (1, 0)


@pytest.mark.slow
def test_compiled_cnn_with_inductor():
    seen = check("cnn", "inductor", steps=4)
    assert seen[-1] == (1, 0), seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["cnn", "gpt"])
def test_compiled_on_cuda_with_inductor(case):
    """On CUDA the SDGP prune runs the Triton kernels inside the compiled graph; float32, so the losses agree to
    rounding of inductor's fused kernels, the masks exactly."""
    seen = check(case, "inductor", steps=4, device="cuda", dtype=torch.float32, rtol=1e-4, atol=1e-5)
    if case == "cnn":
        assert seen[-1] == (1, 0), seen


def test_import_does_not_load_dynamo():
    code = "import sys, nmsparse; sys.exit('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def _conv_parametrizations(model):
    return [p for _, _, p, _ in sparse_layers(model) if p is not None]


def _same(cl, mask):
    """A channels-last copy holds the mask as uint8 (inductor vectorizes uint8 operands, not bool ones)."""
    return cl.dtype == torch.uint8 and torch.equal(cl.bool(), mask)


def test_compiled_graphs_read_a_channels_last_copy_of_each_conv_mask_kept_equal_to_it():
    """Inductor lays convolution weights out channels-last and copied each contiguous bool mask into that layout at
    every step; the parametrization keeps such a copy (not saved) through every way a mask changes."""
    torch.manual_seed(0)
    config = nmsparse.SparsityConfig(weight=nmsparse.WeightNM(2, 4, transposable=True, recompute_every=1))
    model = nmsparse.sparsify(TinyCNN(), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    nmsparse.attach(model, opt)

    def agree():
        convs = 0
        for p in _conv_parametrizations(model):
            if p.mask.dim() == 4:
                convs += 1
                assert p.mask_cl.is_contiguous(memory_format=torch.channels_last) and p.mask.is_contiguous()
                assert _same(p.mask_cl, p.mask)
            else:
                assert p.mask_cl is None  # the Linear head: nothing to lay out
        assert convs == 2  # the 3-channel stem cannot be grouped by 4

    agree()
    before = {k: v.clone() for k, v in nmsparse.weight_masks(model).items()}
    for step in range(2):  # every step recomputes the masks, in place
        x, y = batch("cnn", step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.float()), y).backward()
        opt.step()
        agree()
    assert any(not torch.equal(before[k], v) for k, v in nmsparse.weight_masks(model).items())
    state = model.state_dict()
    assert not any(k.endswith("mask_cl") for k in state)
    fresh = nmsparse.sparsify(TinyCNN(), config)
    fresh.load_state_dict(state)
    model = fresh
    agree()
    copied = copy.deepcopy(fresh)
    for a, b in zip(_conv_parametrizations(copied), _conv_parametrizations(fresh)):
        assert (a.mask_cl is None) == (b.mask_cl is None) and (a.mask_cl is None or _same(a.mask_cl, b.mask))


def test_loading_a_state_keeps_the_channels_last_buffer_and_a_new_mask_rebinds_it():
    def built(seed):
        torch.manual_seed(seed)
        net = nmsparse.sparsify(TinyCNN(), nmsparse.SparsityConfig(weight=nmsparse.WeightNM(2, 4, method="fixed")))
        net(torch.randn(2, 3, 6, 6))
        return net, next(p for p in _conv_parametrizations(net) if p.mask_cl is not None)

    (model, p), (other, q) = built(0), built(1)
    kept, before = p.mask_cl, p.mask.clone()
    assert not torch.equal(q.mask, before)
    model.load_state_dict(other.state_dict())
    assert torch.equal(p.mask, q.mask)
    assert p.mask_cl is kept and _same(kept, p.mask)  # copied into: a captured graph reads the same buffer
    p._set(before)  # as a due update outside advance: rebound, so a pending backward keeps the one it saved
    assert p.mask_cl is not kept and _same(p.mask_cl, before) and _same(kept, q.mask)
