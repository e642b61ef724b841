"""Saved sparsified models load into plain models (and Hugging Face from_pretrained); sparsified twins resume exactly.

Also: the output layer is found from the model whatever its registration order, nn.MultiheadAttention's
q/k/v projection takes weight sparsity, and a selection that on_incompatible="skip" empties is an error.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse import GradSparsity, SparsityConfig, WeightBlock, WeightNM, sparsify, sparsity_report, squash
from nmsparse.nn.filters import output_layers
from nmsparse.nn.state import remove_plain_layout


class Net(nn.Module):
    """Embedding -> attention -> MLP -> head, with the head registered first (as many GPTs do)."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.head = nn.Linear(32, 40, bias=False)
        self.emb = nn.Embedding(40, 32)
        if tied:
            self.head.weight = self.emb.weight
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)  # exercised separately

    def forward(self, idx):
        h = self.emb(idx)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


CONFIGS = [
    SparsityConfig(weight=WeightNM(2, 4)),
    SparsityConfig(weight=WeightNM(2, 4, method="fixed"), grad=GradSparsity(2, 4, "random", layers="conv+linear")),
    SparsityConfig(weight=WeightNM(4, 8, transposable=True, recompute_every=2)),
    SparsityConfig(weight=WeightBlock((8, 8), 0.5)),
]


def _train(model, steps=3, seed=0, opt=None):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 40, (4, 6), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        opt.step()
    return opt


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["srste", "fixed+sdgp", "4:8-T", "block"])
def test_a_plain_model_loads_a_sparsified_state_dict_strictly(cfg):
    torch.manual_seed(0)
    sparse = sparsify(Net(), cfg)
    _train(sparse)
    state = _roundtrip(sparse.state_dict())
    plain = Net()
    plain.load_state_dict(state)  # strict: exactly the plain keys
    assert set(state) == set(Net().state_dict())
    idx = torch.randint(0, 40, (2, 5))
    sparse.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(idx), sparse(idx), rtol=0, atol=0)
    if isinstance(cfg.weight, WeightNM):
        assert nmsparse.is_nm(plain.fc1.weight, cfg.weight.n, cfg.weight.m, dim=1)


@pytest.mark.parametrize("cfg", CONFIGS, ids=["srste", "fixed+sdgp", "4:8-T", "block"])
def test_a_sparsified_twin_resumes_exactly(cfg):
    torch.manual_seed(0)
    a = sparsify(Net(), cfg)
    opt_a = _train(a)
    saved = _roundtrip({"model": a.state_dict(), "opt": opt_a.state_dict()})
    torch.manual_seed(1)  # another init: everything must come from the state dict
    b = sparsify(Net(), cfg)
    b.load_state_dict(saved["model"])
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    opt_b.load_state_dict(saved["opt"])
    _train(a, seed=5, opt=opt_a)
    _train(b, seed=5, opt=opt_b)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    for (na, ba), (nb, bb) in zip(a.named_buffers(), b.named_buffers()):
        assert torch.equal(ba, bb), na


def test_the_older_layout_still_loads_and_a_rebuilt_dict_warns():
    torch.manual_seed(0)
    cfg = SparsityConfig(weight=WeightNM(2, 4), grad=GradSparsity(2, 4, "random", layers="conv+linear"))
    a = sparsify(Net(), cfg)
    _train(a)
    old = copy.deepcopy(a)
    for mod in old.modules():
        remove_plain_layout(mod)
    old_state = old.state_dict()
    assert any(".parametrizations." in k for k in old_state) and any(k.endswith("sdgp_step") for k in old_state)
    b = sparsify(Net(), cfg)
    b.load_state_dict(old_state)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
    rebuilt = {k: v.clone() for k, v in a.state_dict().items()}  # a new dict: no sparsity state
    c = sparsify(Net(), cfg)
    with pytest.warns(UserWarning, match="without nmsparse's sparsity state"):
        c.load_state_dict(rebuilt)
    idx = torch.randint(0, 40, (2, 5))
    a.eval(), c.eval()
    with torch.no_grad():
        torch.testing.assert_close(c(idx), a(idx), rtol=0, atol=0)  # the masked weights, masks recomputed


def test_squash_and_deepcopy_keep_the_layout_consistent():
    torch.manual_seed(0)
    a = sparsify(Net(), CONFIGS[0])
    twin = copy.deepcopy(a)
    _train(twin)
    assert set(twin.state_dict()) == set(Net().state_dict())
    squash(a)
    assert not any(getattr(m, "_nmsparse_state_hooks", None) for m in a.modules())
    assert set(a.state_dict()) == set(Net().state_dict())
    a.load_state_dict(twin.state_dict())  # a plain model again


def test_the_output_layer_is_found_whatever_the_registration_order():
    net = Net()
    assert output_layers(net) == {"head"}  # the embedding's vocabulary (40) names it
    assert output_layers(Net(tied=True)) == {"head"}
    assert output_layers(net, torch.randint(0, 40, (1, 3))) == {"head"}  # the last Linear called
    rows = {r["layer"] for r in sparsity_report(sparsify(Net(), SparsityConfig(weight=WeightNM(2, 4))))}
    assert "head" not in rows and {"fc1", "fc2", "attn.out_proj", "attn.in_proj_weight"} <= rows
    plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 10))
    assert output_layers(plain) == {"3"}  # no embedding, no telling name: the last registered


def test_multihead_attention_projections_take_weight_sparsity():
    torch.manual_seed(0)
    net = sparsify(Net(), SparsityConfig(weight=WeightNM(2, 4)))
    _train(net)
    with torch.no_grad():
        assert nmsparse.is_nm(net.attn.in_proj_weight, 2, 4, dim=1)
        assert nmsparse.is_nm(net.attn.out_proj.weight, 2, 4, dim=1)
    split = nn.MultiheadAttention(32, 4, kdim=16, vdim=16, batch_first=True)
    sparsify(split, SparsityConfig(weight=WeightNM(2, 4)), filter_fn=lambda m, n: True)
    assert {r["layer"] for r in sparsity_report(split)} >= {"q_proj_weight", "k_proj_weight", "v_proj_weight"}


def test_a_selection_that_skip_empties_is_an_error():
    net = nn.Sequential(nn.Conv2d(6, 6, 3), nn.Conv2d(6, 10, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="every selected layer was skipped as incompatible"):
            sparsify(net, SparsityConfig(weight=WeightNM(2, 4), on_incompatible="skip"))
    assert not any(hasattr(m, "parametrizations") for m in net.modules())  # untouched


def test_hugging_face_save_pretrained_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    sparsify(model, SparsityConfig(weight=WeightNM(2, 4)))
    assert "lm_head" not in {r["layer"] for r in sparsity_report(model)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 128, (2, 8))
    for _ in range(2):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    model.save_pretrained(tmp_path)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, model(x).logits, rtol=0, atol=0)
        assert nmsparse.is_nm(plain.model.layers[0].mlp.up_proj.weight, 2, 4, dim=1)
