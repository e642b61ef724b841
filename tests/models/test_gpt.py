"""The GPT: causal masking, the loss of an untrained model, shapes, the tied head, bad inputs."""

import math

import pytest
import torch
import torch.nn.functional as F

from nmsparse.models import GPT, build_for_data, headline


def small(**kw):
    torch.manual_seed(0)
    return GPT(**{"vocab_size": 50, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32, **kw})


@pytest.mark.parametrize("position", [0, 5, 15])
def test_a_future_token_never_changes_a_past_logit(position):
    m = small().eval()
    x = torch.randint(50, (3, 16))
    y = x.clone()
    y[:, position] = (y[:, position] + 7) % 50
    a, b = m(x), m(y)
    assert torch.equal(a[:, :position], b[:, :position])  # exactly: the masked scores are -inf
    assert not torch.allclose(a[:, position:], b[:, position:])


def test_untrained_loss_is_near_log_vocab():
    m = small()
    x, y = torch.randint(50, (8, 16)), torch.randint(50, (8, 16))  # next tokens independent of the inputs
    loss = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
    assert abs(loss.item() - math.log(50)) < 0.05


def test_tied_head_shares_the_embedding_and_untied_does_not():
    m = small()
    assert m.lm_head.weight is m.wte.weight
    u = small(tie_weights=False)
    assert u.lm_head.weight is not u.wte.weight
    assert sum(p.numel() for p in u.parameters()) == sum(p.numel() for p in m.parameters()) + 50 * 32


def test_matches_a_hand_written_attention():
    """The SDPA path against softmax(QK^T / sqrt(d) + causal mask) V written out, in float64."""
    m = small().double().eval()
    attn = m.blocks[0].attn
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    q, k, v = attn.c_attn(x).split(32, dim=2)
    heads = lambda z: z.view(2, 10, 2, 16).transpose(1, 2)
    s = heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(16)
    s = s.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.c_proj((s.softmax(-1) @ heads(v)).transpose(1, 2).reshape(2, 10, 32))
    torch.testing.assert_close(attn(x), ref)


def test_built_from_a_record_with_vocab_and_block():
    m = build_for_data("gpt", {"n_layer": 1, "n_embd": 16, "n_head": 2}, (24,), 33)
    assert m.block_size == 24 and m.lm_head.out_features == 33


@pytest.mark.parametrize("x,message", [
    (torch.zeros(2, 17, dtype=torch.long), "longer than block_size 16"),
    (torch.zeros(2, 4), "integer dtype"),
    (torch.zeros(4, dtype=torch.long), r"shape \(batch, time\)"),
])
def test_bad_inputs_are_named(x, message):
    with pytest.raises(ValueError, match=message):
        small()(x)


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPT(n_embd=30, n_head=4)


def test_generate_extends_within_the_block():
    m = small().eval()
    out = m.generate(torch.zeros(1, 3, dtype=torch.long), 20, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 23) and int(out.max()) < 50


def test_evaluate_reports_loss_per_token_and_perplexity():
    from nmsparse.models import evaluate
    m = small()
    x = torch.randint(50, (6, 16))
    res = evaluate(m, [(x[:3], x[:3]), (x[3:], x[3:])], "cpu")
    ref = F.cross_entropy(m(x).flatten(0, 1), x.flatten()).item()
    assert abs(res["val_loss"] - ref) < 1e-5 and abs(res["val_ppl"] - math.exp(ref)) < 1e-3
    assert headline(res) == ("val_loss", "validation loss (nats/char)", False)
