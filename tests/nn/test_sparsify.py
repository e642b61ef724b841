"""sparsify() on ResNet- and transformer-shaped models: filters, errors, report, squash, state, compile."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import nmsparse
from nmsparse import (GradSparsity, SADTracker, SparsityConfig, WeightBlock, WeightNM, sparsify,
                      sparsity_report, squash)
from nmsparse.nn.sdgp import SDGPConv2d, SDGPLinear


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.short(x))


class TinyResNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.layer1 = Block(16, 16)
        self.layer2 = Block(16, 32, stride=2)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(torch.relu(self.bn(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class TinyTransformer(nn.Module):
    def __init__(self, dim=32, classes=10):
        super().__init__()
        self.embed = nn.Linear(16, dim)
        self.attn = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.fc2(torch.relu(self.fc1(self.norm2(x))))
        return self.head(x.mean(1))


def batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def train_steps(model, steps=4, seed=0, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for s in range(steps):
        x, y = batch(seed + s)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


BOTH = SparsityConfig(weight=WeightNM(2, 4), grad=GradSparsity(2, 4, "rescale"))


def test_default_filter_matches_the_references():
    torch.manual_seed(0)
    model = sparsify(TinyResNet(), BOTH)
    kinds = {name: (parametrize.is_parametrized(m, "weight"), isinstance(m, SDGPConv2d))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert kinds["stem"] == (False, False)  # 3 input channels: dense
    assert kinds["fc"] == (False, False)  # final classifier: dense
    for name in ["layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2", "layer2.short.0"]:
        assert kinds[name] == (True, True), name
    losses, _ = train_steps(model)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_transformer_linear_layers():
    torch.manual_seed(0)
    cfg = SparsityConfig(weight=WeightNM(2, 4), grad=GradSparsity(2, 4, "magnitude", layers="conv+linear"))
    model = sparsify(TinyTransformer(), cfg)
    assert isinstance(model.fc1, SDGPLinear) and isinstance(model.fc2, SDGPLinear)
    assert not isinstance(model.head, SDGPLinear) and not parametrize.is_parametrized(model.head)
    assert parametrize.is_parametrized(model.attn.out_proj, "weight")
    x = torch.randn(4, 6, 16)
    model(x).sum().backward()
    w = model.fc1.weight
    assert nmsparse.is_nm(w, 2, 4, dim=1)
    assert model.fc1.parametrizations.weight.original.grad is not None


def test_filter_fn_and_name_patterns():
    only_first = sparsify(TinyResNet(), SparsityConfig(weight=WeightNM(2, 4)),
                          filter_fn=lambda name, m: name == "layer1.conv1")
    assert [r["layer"] for r in sparsity_report(only_first)] == ["layer1.conv1"]
    cfg = SparsityConfig(weight=WeightNM(2, 4), include=["layer2.*", "fc"], exclude=["layer2.short.*"])
    model = sparsify(TinyResNet(), cfg)
    assert [r["layer"] for r in sparsity_report(model)] == ["layer2.conv1", "layer2.conv2", "fc"]


def test_incompatible_layer_error_names_it_and_skip_warns():
    model = nn.Sequential(nn.Conv2d(8, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match=r"layer '2'.*Conv2d.*on_incompatible='skip'"):
        sparsify(copy.deepcopy(model), SparsityConfig(weight=WeightNM(2, 4)))
    with pytest.raises(ValueError, match=r"layer '0'.*6 output channels"):
        sparsify(copy.deepcopy(model), SparsityConfig(grad=GradSparsity(2, 4)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sparsify(copy.deepcopy(model), SparsityConfig(weight=WeightNM(2, 4), on_incompatible="skip"))
    assert any("skipping layer '2'" in str(w.message) for w in caught)
    assert [r["layer"] for r in sparsity_report(out)] == ["0"]


def test_sparsify_twice_is_an_error():
    model = sparsify(TinyResNet(), BOTH)
    with pytest.raises(ValueError, match="already sparsified"):
        sparsify(model, BOTH)


def test_config_from_dict_and_errors():
    cfg = SparsityConfig.from_dict({"weight": {"kind": "block", "block": [8, 8], "sparsity": 0.5},
                                    "grad": {"n": 2, "m": 4, "method": "random"}})
    assert isinstance(cfg.weight, WeightBlock) and cfg.weight.block == (8, 8)
    assert SparsityConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown key sparsity.grad.methd; did you mean 'method'"):
        SparsityConfig.from_dict({"grad": {"methd": "rescale"}})
    with pytest.raises(ValueError, match=r"unknown key sparsity.grad.zzz\. Valid keys: "):
        SparsityConfig.from_dict({"grad": {"zzz": 1}})
    with pytest.raises(ValueError, match="grad.method"):
        GradSparsity(method="max")
    with pytest.raises(ValueError, match="weight: n must be <= m"):
        WeightNM(n=5, m=4)
    with pytest.raises(ValueError, match="both are None"):
        SparsityConfig()
    with pytest.raises(TypeError, match="config must be"):
        sparsify(TinyResNet(), "2:4")


def test_report_and_squash():
    torch.manual_seed(0)
    model = sparsify(TinyResNet(), SparsityConfig(weight=WeightNM(2, 4), grad=GradSparsity(2, 4)))
    train_steps(model, steps=2)
    rows = sparsity_report(model)
    assert {r["weight"] for r in rows} == {"2:4 srste"}
    assert all(abs(r["density"] - 0.5) < 1e-6 for r in rows)
    assert all(r["grad"] == "SDGP 2:4 rescale" for r in rows)
    assert "| total |" in nmsparse.format_report(rows)
    model.eval()
    x, _ = batch(9)
    before = model(x)
    squash(model)
    assert not any(isinstance(m, (SDGPConv2d, SDGPLinear)) or parametrize.is_parametrized(m)
                   for m in model.modules())
    assert type(model.layer1.conv1) is nn.Conv2d
    assert torch.allclose(model(x), before, atol=1e-6)
    assert nmsparse.is_nm(model.layer1.conv1.weight, 2, 4, dim=1)


@pytest.mark.parametrize("weight", [WeightNM(2, 4), WeightNM(1, 4, method="fixed"),
                                    WeightNM(4, 8, transposable=True, recompute_every=2),
                                    WeightBlock((8, 8), 0.5)])
def test_state_dict_round_trip_continues_identically(weight):
    cfg = SparsityConfig(weight=weight, grad=GradSparsity(2, 4, "random"))
    torch.manual_seed(0)
    a = sparsify(TinyResNet(), cfg)
    _, opt_a = train_steps(a, steps=3)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    torch.manual_seed(1)  # different init: everything must come from the state dict
    b = sparsify(TinyResNet(), cfg)
    b.load_state_dict(state["model"])
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    opt_b.load_state_dict(state["opt"])
    for s in range(3, 7):
        x, y = batch(s)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(pa, pb), (s, na)


def test_deepcopy_continues_identically():
    torch.manual_seed(0)
    a = sparsify(TinyResNet(), BOTH)
    train_steps(a, steps=2)
    b = copy.deepcopy(a)
    la, _ = train_steps(a, steps=3, seed=5)
    lb, _ = train_steps(b, steps=3, seed=5)
    assert la == lb


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = sparsify(TinyResNet(), SparsityConfig(weight=WeightNM(2, 4), grad=GradSparsity(2, 4, "rescale")))
    compiled = torch.compile(copy.deepcopy(model), backend="aot_eager")
    x, y = batch(3)
    grads = []
    for net in (model, compiled):
        net.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for ge, gc in zip(*grads):
        assert torch.allclose(ge, gc, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_sad_tracker():
    torch.manual_seed(0)
    model = sparsify(TinyResNet(), SparsityConfig(weight=WeightNM(2, 4)))
    train_steps(model, steps=1)
    tracker = SADTracker(model)
    assert tracker.sad().count == 0
    train_steps(model, steps=6, lr=0.5)
    moved = tracker.sad()
    assert moved.count > 0 and 0 < moved.fraction < 1
    fixed = sparsify(TinyResNet(), SparsityConfig(weight=WeightNM(2, 4, method="fixed")))
    train_steps(fixed, steps=1)
    tracker = SADTracker(fixed)
    train_steps(fixed, steps=6, lr=0.5)
    assert tracker.sad().count == 0
