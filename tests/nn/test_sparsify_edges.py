"""sparsify on awkward models and configs: attention, string patterns, empty selections, atomicity, copies."""

import copy

import pytest
import torch
from torch import nn

from nmsparse.nn.config import GradSparsity, SparsityConfig, WeightBlock, WeightNM
from nmsparse.nn.sdgp import SDGPConv2d, SDGPLinear
from nmsparse.nn.sparsify import sparsify, sparsity_report, squash


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mid = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.inp(x)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.relu(self.mid(h)))


def _sdgp_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, (SDGPConv2d, SDGPLinear))}


def test_multihead_attention_projection_is_not_an_sdgp_layer():
    model = sparsify(AttnNet(), SparsityConfig(grad=GradSparsity(2, 4, "magnitude", layers="conv+linear")))
    assert _sdgp_names(model) == {"inp", "mid"}  # attn.out_proj is skipped, head is the classifier
    with pytest.raises(ValueError, match=r"'attn.out_proj' belongs to an nn.MultiheadAttention"):
        sparsify(AttnNet(), SparsityConfig(grad=GradSparsity(2, 4, layers="conv+linear")),
                 filter_fn=lambda n, m: n == "attn.out_proj")
    # weight sparsity reads out_proj.weight through the parametrization, which MHA does use
    model = sparsify(AttnNet(), SparsityConfig(weight=WeightNM(2, 4)), filter_fn=lambda n, m: n == "attn.out_proj")
    model.train()
    model(torch.randn(2, 5, 16)).sum().backward()
    w = model.attn.out_proj.weight.detach()
    assert int((w != 0).view(32, 8, 4).sum(-1).max()) <= 2


def test_string_include_and_exclude_are_one_pattern():
    net = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16, 4))
    model = sparsify(copy.deepcopy(net), {"weight": {"n": 2, "m": 4}, "include": "1"})
    assert [r["layer"] for r in sparsity_report(model)] == ["1"]
    model = sparsify(copy.deepcopy(net), {"weight": {"n": 2, "m": 4}, "exclude": "1"})
    assert [r["layer"] for r in sparsity_report(model)] == ["0"]
    with pytest.raises(TypeError, match="sparsity.include must be a module-name pattern"):
        SparsityConfig(weight=WeightNM(), include=[1])


def test_nothing_selected_is_an_error():
    net = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"no layer selected for weight sparsity: filter_fn .* \(0, 2\)"):
        sparsify(net, SparsityConfig(weight=WeightNM()), filter_fn=lambda n, m: False)
    with pytest.raises(ValueError, match=r"include=\['conv\*'\]"):
        sparsify(net, {"weight": {"n": 2, "m": 4}, "include": ["conv*"]})
    mlp = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match=r"no layer selected for gradient \(SDGP\) sparsity: the default filter"):
        sparsify(mlp, SparsityConfig(grad=GradSparsity()))  # layers="conv" on a model without convs


@pytest.mark.parametrize("cfg", [SparsityConfig(grad=GradSparsity(2, 4)), SparsityConfig(weight=WeightNM(2, 4))])
def test_a_failing_layer_leaves_the_model_untouched(cfg):
    net = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 30, 3), nn.Conv2d(30, 32, 3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="layer '(1|2)'"):
        sparsify(net, cfg)
    assert not _sdgp_names(net) and not sparsity_report(net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    cfg.on_incompatible = "skip"  # the retry the message suggests works
    with pytest.warns(UserWarning, match="skipping layer"):
        sparsify(net, cfg)
    assert len(sparsity_report(net)) == 2


def test_deepcopy_then_squash_keeps_both_models_working():
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1))
    model = sparsify(net, SparsityConfig(weight=WeightNM(2, 4), grad=GradSparsity(2, 4)), filter_fn=lambda n, m: True)
    x = torch.randn(2, 8, 6, 6)
    model.eval()
    want = model(x)
    twin = copy.deepcopy(model)
    squash(twin)
    assert torch.equal(twin(x), want) and torch.equal(model(x), want)
    squash(model)
    assert torch.equal(model(x), want)
    assert type(model[0]) is nn.Conv2d and type(twin[0]) is nn.Conv2d


def test_depthwise_convs_are_left_out_of_weight_sparsity_by_default():
    net = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 16, 1))
    model = sparsify(net, SparsityConfig(weight=WeightNM(2, 4)))
    assert [r["layer"] for r in sparsity_report(model)] == ["0", "2"]
    with pytest.raises(ValueError, match=r"layer '0' .*dim 1 \(input channels\) has size 1"):  # chosen explicitly
        sparsify(nn.Sequential(nn.Conv2d(16, 16, 3, groups=16)), SparsityConfig(weight=WeightNM(2, 4)),
                 filter_fn=lambda n, m: True)


@pytest.mark.parametrize("make, msg", [
    (lambda: WeightNM(method="sr-ste"), "sparsity.weight: method must be one of"),
    (lambda: WeightNM(mask_method="optimal"), "sparsity.weight: mask_method"),
    (lambda: WeightNM(decay=-1), "sparsity.weight: decay"),
    (lambda: WeightBlock(sparsity=1.5), "sparsity.weight: sparsity must be in"),
    (lambda: WeightBlock(block=(8,)), "sparsity.weight: block must be a pair"),
    (lambda: WeightBlock(schedule="gradual"), "needs end_step"),
    (lambda: SparsityConfig(grad={"seed": 1.5}), "grad.seed must be an int, got 1.5"),
    (lambda: SparsityConfig(weight=3), "sparsity.weight must be a WeightNM"),
])
def test_settings_are_checked_when_written(make, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        make()


def test_dicts_where_dataclasses_go():
    cfg = SparsityConfig(weight={"n": 2, "m": 4}, grad={"method": "magnitude"})
    assert cfg.weight == WeightNM(2, 4) and cfg.grad == GradSparsity(method="magnitude")
    assert SparsityConfig(weight={"kind": "block", "sparsity": 0.25}).weight == WeightBlock(sparsity=0.25)
