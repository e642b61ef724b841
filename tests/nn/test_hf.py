"""Hugging Face transformers models (the optional extra nmsparse[hf]): GPT-2's Conv1D and Llama's Linears.

Conv1D computes y = x @ W + b with W stored (in, out): its N:M groups run along dim 0, the input features,
so its mask is the transpose of the mask an nn.Linear holding W^T gets.
"""

import ast
import copy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse import GradSparsity, SparsityConfig, WeightBlock, WeightNM, sparsify, sparsity_report, squash
from nmsparse.nn import weight as nw
from nmsparse.nn.layers import is_hf_conv1d, out_in_view, weight_dims
from nmsparse.patterns import block_mask, is_nm, is_transposable, nm_mask, transposable_mask

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 100


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def llama(seed: int = 0, tied: bool = False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def conv1ds(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Conv1D)]


def ids(vocab=VOCAB, shape=(2, 8), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(x).logits


def test_no_module_imports_transformers_at_import_time():
    src = Path(nmsparse.__file__).parent
    for path in src.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only: lazy imports inside functions are fine
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "transformers" for n in names), f"{path}: imports transformers"


@pytest.mark.slow  # a fresh interpreter imports torch (seconds)
def test_importing_nmsparse_leaves_transformers_unimported():
    code = "import sys, nmsparse, nmsparse.prune; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_conv1d_is_recognised_by_its_class():
    assert is_hf_conv1d(Conv1D(8, 4)) and not is_hf_conv1d(nn.Linear(4, 8))
    assert weight_dims(Conv1D(8, 4)) == (1, 0) and weight_dims(nn.Linear(4, 8)) == (0, 1)
    layer = Conv1D(8, 4)
    assert torch.equal(out_in_view(layer), layer.weight.t())


WEIGHT_CONFIGS = {
    "srste": WeightNM(2, 4),
    "ste": WeightNM(2, 4, method="ste"),
    "fixed": WeightNM(2, 4, method="fixed"),
    "4:8-T": WeightNM(4, 8, transposable=True),
    "block": WeightBlock((8, 4), 0.5),  # not square: a transposed mask would differ
}


@pytest.mark.parametrize("kind", sorted(WEIGHT_CONFIGS))
def test_conv1d_mask_is_the_transposed_mask_of_the_equivalent_linear(kind):
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(16, 32))   # W: (in=32, out=16)
    lin = nn.Sequential(nn.Linear(32, 16))
    with torch.no_grad():
        lin[0].weight.copy_(conv[0].weight.t())
        lin[0].bias.copy_(conv[0].bias)
    cfg = SparsityConfig(weight=WEIGHT_CONFIGS[kind])
    sparsify(conv, cfg, filter_fn=lambda m, n: True)
    sparsify(lin, cfg, filter_fn=lambda m, n: True)
    mask_c, mask_l = nw.current_mask(conv[0]), nw.current_mask(lin[0])
    assert mask_c.shape == (32, 16)
    assert torch.equal(mask_c.t(), mask_l)
    w = conv[0].parametrizations.weight.original.detach()
    if kind == "block":
        assert torch.equal(mask_c.t(), block_mask(w.t(), (8, 4), 0.5))
    elif kind == "4:8-T":
        assert is_transposable(mask_c.t(), 4, 8) and torch.equal(mask_c.t(), transposable_mask(w.t(), 4, 8))
    else:
        assert is_nm(mask_c, 2, 4, dim=0)   # along the input features: N per M-group of W^T's rows
        assert torch.equal(mask_c.t(), nm_mask(w.t(), 2, 4, dim=1))
    x = torch.randn(5, 32)
    torch.testing.assert_close(conv(x), lin(x))


def test_forward_of_sparsified_gpt2_is_the_masked_weights_product():
    model = gpt2()
    plain = copy.deepcopy(model)
    sparsify(model, SparsityConfig(weight=WeightNM(2, 4)))
    layers = {r["layer"] for r in sparsity_report(model)}
    assert layers == {n for n, _ in conv1ds(plain)}  # lm_head (tied to wte) and the embeddings stay dense
    with torch.no_grad():
        for _, mod in conv1ds(plain):
            mod.weight.mul_(nm_mask(mod.weight, 2, 4, dim=0))   # groups of 4 input features
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(plain, x), rtol=0, atol=0)
    layer = model.transformer.h[0].mlp.c_fc
    h = torch.randn(3, 64)
    w = layer.parametrizations.weight.original.detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(h), torch.addmm(layer.bias, h, w * nm_mask(w, 2, 4, dim=0)))


def test_srste_training_on_gpt2_keeps_2_4_along_the_input_features():
    model = gpt2()
    sparsify(model, SparsityConfig(weight=WeightNM(2, 4, method="srste")))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = ids()
    before = nmsparse.weight_masks(model)
    model.train()
    for _ in range(4):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()
        for _, mod in conv1ds(model):
            assert is_nm(mod.weight.detach(), 2, 4, dim=0)
    after = nmsparse.weight_masks(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # SR-STE recomputes its masks
    for _, mod in conv1ds(model):
        dense = mod.parametrizations.weight.original.detach()
        assert torch.equal(nw.current_mask(mod), nm_mask(dense, 2, 4, dim=0))


def test_transposable_and_block_on_gpt2():
    for cfg, check in ((WeightNM(4, 8, transposable=True), lambda w: is_transposable(w.t(), 4, 8)),
                       (WeightBlock((8, 4), 0.5), lambda w: torch.equal(w.t() != 0, block_mask(w.t(), (8, 4), 0.5)))):
        model = gpt2()
        sparsify(model, SparsityConfig(weight=cfg))
        model.eval()
        with torch.no_grad():
            for _, mod in conv1ds(model):
                assert check(mod.weight)


def test_sdgp_on_gpt2_conv1d_prunes_the_input_gradient_only():
    model = gpt2()
    sparsify(model, SparsityConfig(grad=GradSparsity(2, 4, method="magnitude", layers="conv+linear")))
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer, nmsparse.SDGPConv1D) and layer.weight.shape == (64, 256)
    h = torch.randn(3, 5, 64, requires_grad=True)
    g = torch.randn(3, 5, 256)
    y = layer(h)
    torch.testing.assert_close(y, torch.addmm(layer.bias, h.detach().reshape(-1, 64), layer.weight.detach())
                               .reshape(3, 5, 256))
    y.backward(g)
    gp = g * nm_mask(g, 2, 4, dim=-1)
    torch.testing.assert_close(h.grad, gp @ layer.weight.detach().t())            # dX from the pruned dY
    torch.testing.assert_close(layer.weight.grad, h.detach().reshape(-1, 64).t() @ g.reshape(-1, 256))  # dense dW
    x = ids()
    model.train()
    model(x, labels=x).loss.backward()
    squash(model)
    assert type(model.transformer.h[0].mlp.c_fc) is Conv1D
    assert model.transformer.h[0].mlp.c_fc.weight is layer.weight


def test_weight_and_sdgp_together_on_gpt2_then_squash():
    model = gpt2()
    sparsify(model, SparsityConfig(weight=WeightNM(2, 4), grad=GradSparsity(2, 4, layers="conv+linear")))
    rows = sparsity_report(model)
    assert rows and all(r["type"] == "SDGPConv1D" and r["weight"] == "2:4 srste" for r in rows)
    x = ids()
    model.train()
    model(x, labels=x).loss.backward()
    twin = copy.deepcopy(model)
    squash(model)
    for _, mod in conv1ds(model):
        assert type(mod) is Conv1D and is_nm(mod.weight, 2, 4, dim=0)
    torch.testing.assert_close(logits(model, x), logits(twin, x))


def lm_steps(model, opt, x, steps):
    """`steps` optimizer steps of the language-model loss on x (its own next tokens)."""
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x, labels=x).loss.backward()
        opt.step()


@pytest.mark.parametrize("squashed,sdgp", [(True, False), (False, False), (False, True)])
def test_gpt2_save_pretrained_reloads_as_a_plain_model(tmp_path, squashed, sdgp):
    model = gpt2()
    grad = GradSparsity(2, 4, layers="conv+linear") if sdgp else None
    sparsify(model, SparsityConfig(weight=WeightNM(2, 4), grad=grad))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = ids()
    lm_steps(model, opt, x, 2)
    if squashed:
        squash(model)
    model.save_pretrained(tmp_path)
    plain = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(plain, x), logits(model, x), rtol=0, atol=0)
    for name, mod in conv1ds(plain):
        assert type(mod) is Conv1D and is_nm(mod.weight, 2, 4, dim=0), name
    assert not is_nm(plain.lm_head.weight, 2, 4, dim=1)


def test_gpt2_state_dict_resumes_a_sparsified_twin_exactly():
    cfg = SparsityConfig(weight=WeightNM(2, 4), grad=GradSparsity(2, 4, method="random", layers="conv+linear"))
    model = sparsify(gpt2(), cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = ids()
    lm_steps(model, opt, x, 2)
    state = model.state_dict()
    assert "transformer.h.0.attn.c_attn.weight" in state and not any("parametrizations" in k for k in state)
    twin = sparsify(gpt2(seed=5), cfg)
    twin.load_state_dict(state)
    for k, v in nmsparse.weight_masks(model).items():
        assert torch.equal(nmsparse.weight_masks(twin)[k], v)
    torch.testing.assert_close(logits(twin, x), logits(model, x), rtol=0, atol=0)
    rebuilt = sparsify(gpt2(seed=6), SparsityConfig(weight=WeightNM(2, 4)))
    with pytest.warns(UserWarning, match="masks were recomputed"):
        rebuilt.load_state_dict({k: v for k, v in state.items()})   # metadata lost: masks from the masked weights
    for name, mod in conv1ds(rebuilt):
        assert torch.equal(nw.current_mask(mod), state[name + ".weight"] != 0)   # (in, out), as stored
    torch.testing.assert_close(logits(rebuilt, x), logits(model, x), rtol=0, atol=0)


def test_sdgp_on_gpt2_with_the_default_layers_says_how_to_add_conv1d():
    with pytest.raises(ValueError, match=r"no layer selected for gradient.*layers='conv\+linear'"):
        sparsify(gpt2(), SparsityConfig(grad=GradSparsity(2, 4)))


def test_llama_default_selection_squash_and_save_pretrained(tmp_path):
    for tied in (False, True):
        model = llama(tied=tied)
        sparsify(model, SparsityConfig(weight=WeightNM(2, 4)))
        names = {r["layer"].rsplit(".", 1)[-1] for r in sparsity_report(model)}
        assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
        assert not any("lm_head" in r["layer"] or "embed" in r["layer"] for r in sparsity_report(model))
    x = ids(128)
    squash(model)
    model.save_pretrained(tmp_path)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(plain, x), logits(model, x), rtol=0, atol=0)
    assert is_nm(plain.model.layers[1].self_attn.k_proj.weight, 2, 4, dim=1)


def test_llama_takes_transposable_block_and_sdgp():
    x = ids(128)
    for cfg in (SparsityConfig(weight=WeightNM(4, 8, transposable=True)), SparsityConfig(weight=WeightBlock((8, 8))),
                SparsityConfig(grad=GradSparsity(2, 4, layers="conv+linear"))):
        model = llama()
        sparsify(model, cfg)
        assert len(sparsity_report(model)) == 14 and "lm_head" not in {r["layer"] for r in sparsity_report(model)}
        model.train()
        model(x, labels=x).loss.backward()
        squash(model)
        assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
        assert model.model.layers[0].mlp.up_proj.weight.grad is not None


class FP8Proj(nn.Module):
    """A layer transformers might define whose weight nmsparse cannot orient."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))

    def forward(self, x):
        return x @ self.weight.t()


FP8Proj.__module__ = "transformers.integrations.fake"


def test_an_unknown_layer_type_is_named_with_what_works():
    model = gpt2()
    model.transformer.h[0].mlp.c_fc = FP8Proj(64, 256)
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.mlp\.c_fc' is a transformers\.integrations\.fake\."
                                         r"FP8Proj .*nn\.Linear, nn\.Conv2d or transformers' Conv1D"):
        sparsify(model, SparsityConfig(weight=WeightNM(2, 4), include=["*.mlp.*"]))
    assert not any(nw.find_parametrization(m) for m in model.modules())  # nothing converted
    with pytest.warns(UserWarning, match="skipping layer 'transformer.h.0.mlp.c_fc'"):
        sparsify(model, SparsityConfig(weight=WeightNM(2, 4), include=["*.mlp.*"], on_incompatible="skip"))
    assert len(sparsity_report(model)) == 3
    fresh = gpt2()
    fresh.transformer.h[1].attn.c_proj = FP8Proj(64, 64)
    with pytest.raises(ValueError, match=r"'transformer\.h\.1\.attn\.c_proj' is a .*FP8Proj"):
        nmsparse.magnitude_prune(fresh, "2:4", filter_fn=lambda m, n: n.endswith("c_proj"))


def test_a_model_of_unknown_layers_only_names_them():
    net = nn.Sequential(FP8Proj(8, 8), nn.ReLU(), FP8Proj(8, 8))
    with pytest.raises(ValueError, match=r"no layer selected.*0 \(FP8Proj\), 2 \(FP8Proj\).*transformers' Conv1D"):
        sparsify(net, SparsityConfig(weight=WeightNM(2, 4)))


def test_a_declared_in_out_layer_takes_weight_sparsity_but_not_sdgp():
    class InOut(FP8Proj):
        nmsparse_weight_in_out = True

        def forward(self, x):
            return x @ self.weight

    net = nn.Sequential(InOut(8, 16))   # weight (16, 8) read as (in, out)
    sparsify(net, SparsityConfig(weight=WeightNM(2, 4)), filter_fn=lambda m, n: True)
    assert is_nm(nw.current_mask(net[0]), 2, 4, dim=0)
    with pytest.raises(ValueError, match="SDGP swaps the layer .* not for InOut"):
        sparsify(nn.Sequential(InOut(8, 16)), SparsityConfig(grad=GradSparsity(layers="conv+linear")),
                 filter_fn=lambda m, n: True)


def test_conv1d_that_m_does_not_divide_names_its_input_dim():
    net = nn.Sequential(Conv1D(8, 6))   # 6 input features
    with pytest.raises(ValueError, match=r"layer '0' \(Conv1D \(6, 8\) \(stored \(in, out\).*dim 0 \(input features\) "
                                         r"has size 6"):
        sparsify(net, SparsityConfig(weight=WeightNM(2, 4)), filter_fn=lambda m, n: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(nn.Sequential(Conv1D(6, 8)), SparsityConfig(weight=WeightNM(2, 4)), filter_fn=lambda m, n: True)
