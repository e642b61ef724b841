"""One-shot pruning of Hugging Face models: GPT-2's Conv1D (weight stored (in, out)) along its input features."""

import copy

import pytest
import torch
from torch import nn

from nmsparse import SparsityConfig, WeightNM, is_nm, sparsify, sparsity_report
from nmsparse.patterns import block_mask, is_transposable, nm_mask
from nmsparse.prune import adaprune, layer_mask, magnitude_prune, prune_blocks, prune_trained_model

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def conv1ds(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]


def ids(shape=(4, 8), seed=1):
    return torch.randint(0, 100, shape, generator=torch.Generator().manual_seed(seed))


def test_magnitude_prune_gpt2_along_the_input_features():
    model = gpt2()
    dense = copy.deepcopy(model)
    magnitude_prune(model, "2:4")
    for (name, mod), (_, ref) in zip(conv1ds(model), conv1ds(dense)):
        w = ref.weight.detach()
        assert torch.equal(mod.weight, w * nm_mask(w, 2, 4, dim=0)), name
    assert torch.equal(model.lm_head.weight, dense.lm_head.weight)   # tied to wte: the output head stays dense
    assert torch.equal(model.transformer.wpe.weight, dense.transformer.wpe.weight)


def test_magnitude_prune_transposable_and_blocks_on_conv1d():
    model = gpt2()
    magnitude_prune(model, "4:8-T")
    assert all(is_transposable(m.weight.t(), 4, 8) for _, m in conv1ds(model))
    model, dense = gpt2(), gpt2()
    magnitude_prune(model, "block8x4")
    for (_, mod), (_, ref) in zip(conv1ds(model), conv1ds(dense)):
        assert torch.equal(mod.weight != 0, block_mask(ref.weight.t(), (8, 4), 0.5).t())
    model = gpt2()
    assert len(prune_blocks(model, 0.5, (8, 4))) == 8   # the Conv1Ds; lm_head's 100 outputs are not a multiple of 8


def test_layer_mask_is_the_linear_mask_transposed():
    conv = Conv1D(16, 32)
    lin = nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.t())
    for pattern in ("2:4", "4:8-T", "block8x4"):
        assert torch.equal(layer_mask(conv, pattern), layer_mask(lin, pattern).t())


def test_pattern_that_does_not_fit_names_the_conv1d_input_dim():
    net = nn.Sequential(Conv1D(8, 6))
    with pytest.raises(ValueError, match=r"layer '0' \(weight \(8, 6\) as \(out, in\) \(stored \(in, out\).*dim 1 has "
                                         r"size 6"):
        magnitude_prune(net, "2:4", filter_fn=lambda m, n: True)


@pytest.mark.parametrize("absorb", [True, False])
def test_adaprune_conv1d_matches_the_equivalent_linear(absorb):
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(16, 32), nn.ReLU(), Conv1D(8, 16))
    lin = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    with torch.no_grad():
        for c, li in ((conv[0], lin[0]), (conv[2], lin[2])):
            li.weight.copy_(c.weight.t())
            li.bias.copy_(c.bias)
    x = torch.randn(64, 32)
    rc, rl = [], []
    everything = lambda m, n: True  # noqa: E731
    adaprune(conv, x, "2:4", iters=5, batch=16, absorb_mean=absorb, filter_fn=everything, report=rc)
    adaprune(lin, x, "2:4", iters=5, batch=16, absorb_mean=absorb, filter_fn=everything, report=rl)
    for c, li in ((conv[0], lin[0]), (conv[2], lin[2])):
        assert is_nm(c.weight, 2, 4, dim=0)
        torch.testing.assert_close(c.weight.t(), li.weight, rtol=1e-5, atol=1e-6)
    assert [r["name"] for r in rc] == ["0", "2"]
    for a, b in zip(rc, rl):
        assert a["mse_init"] == pytest.approx(b["mse_init"], rel=1e-4)


def test_adaprune_gpt2_from_token_ids():
    model = gpt2()
    report = []
    adaprune(model, ids((8, 8)), "2:4", iters=3, batch=4, report=report)
    assert [r["name"] for r in report] == [n for n, _ in conv1ds(model)]   # forward order, lm_head left out
    assert all(0 <= r["mse_final"] < float("inf") for r in report)
    assert all(is_nm(m.weight, 2, 4, dim=0) for _, m in conv1ds(model))
    assert not is_nm(model.lm_head.weight, 2, 4, dim=1, exact=False)


def test_prune_trained_model_gpt2_keeps_the_pattern_through_fine_tuning():
    model = gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    prune_trained_model(model, "2:4", opt)
    assert {r["weight"] for r in sparsity_report(model)} == {"2:4 fixed"} and len(sparsity_report(model)) == 8
    x = ids()
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
    assert all(is_nm(m.weight.detach(), 2, 4, dim=0) for _, m in conv1ds(model))


def test_llama_magnitude_prune_along_dim_1():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    head = model.lm_head.weight.detach().clone()
    magnitude_prune(model, "2:4")
    layer = model.model.layers[0]
    for mod in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.down_proj):
        assert is_nm(mod.weight, 2, 4, dim=1)
    assert torch.equal(model.lm_head.weight, head)
    sparsify(model, SparsityConfig(weight=WeightNM(2, 4, method="fixed")))


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8-T"])
def test_wanda_and_sparsegpt_on_gpt2_prune_along_the_input_features(method, pattern):
    """Conv1D's weight is (in, out): the pattern must hold on W^T, and the result must equal pruning the
    equivalent nn.Linear model (each Conv1D replaced by a Linear holding W^T)."""
    from nmsparse import prune as P
    from nmsparse.nn.layers import is_hf_conv1d
    from nmsparse.patterns import is_transposable
    model = gpt2()
    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        if is_hf_conv1d(mod):
            lin = nn.Linear(mod.weight.shape[0], mod.weight.shape[1])
            with torch.no_grad():
                lin.weight.copy_(mod.weight.t()), lin.bias.copy_(mod.bias)
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, lin)
    x = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    fn = getattr(P, f"{method}_prune")
    fn(model, x, pattern)
    fn(twin, x, pattern)
    n, m = (2, 4) if pattern == "2:4" else (4, 8)
    checked = 0
    for (name, mod), (_, lin) in zip(model.named_modules(), twin.named_modules()):
        if is_hf_conv1d(mod):
            wt = mod.weight.detach().t()
            torch.testing.assert_close(wt, lin.weight.detach(), rtol=1e-5, atol=1e-6)
            kept = (wt != 0).reshape(wt.shape[0], -1, m).sum(-1)
            assert bool((kept <= n).all()), name
            if pattern.endswith("-T"):
                assert is_transposable(wt != 0, n, m)
            checked += 1
    assert checked > 0
