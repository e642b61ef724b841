"""The layer-wise driver Wanda and SparseGPT share: layers as X W^T, forward order, calibration checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nmsparse.prune import sparsegpt_prune, wanda_prune
from nmsparse.prune.layerwise import LayerView, capture, forward_order

METHODS = [wanda_prune, sparsegpt_prune]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=3, stride=2, padding=0),
    dict(kernel_size=(3, 1), dilation=2, padding=(2, 1)),
    dict(kernel_size=3, padding="same", dilation=2),
    dict(kernel_size=4, padding="same"),  # even kernel: torch pads one more on the right
    dict(kernel_size=2, padding="valid", stride=(1, 2)),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=2, padding_mode="circular", groups=2),
    dict(kernel_size=1, groups=4),
])
def test_conv_as_matrix_product(kwargs):
    """X W2^T of the view, per group, is the conv's output (without its bias), position by position."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, **kwargs).double()
    x = torch.randn(3, 8, 9, 10, dtype=torch.float64)
    view = LayerView("c", conv)
    y = conv(x) - conv.bias[None, :, None, None]
    xs, w2 = view.inputs(x), view.weight2d()
    assert xs.shape[0] == conv.groups and xs.shape[1] == 3 * y.shape[2] * y.shape[3]
    for g in range(conv.groups):
        rows = view.rows_of_group(g)
        want = y[:, rows].permute(0, 2, 3, 1).reshape(-1, rows.stop - rows.start)
        torch.testing.assert_close(xs[g] @ w2[rows].T, want)
    view.set_weight2d(w2 * 2)
    torch.testing.assert_close(view.weight2d(), w2 * 2)


@pytest.mark.parametrize("layer,shape", [(nn.Linear(8, 4), (7, 5, 8)), (nn.Linear(8, 4), (8,)),
                                         (nn.Conv2d(4, 4, 3, padding=1), (7, 4, 5, 5)),
                                         (nn.Conv2d(4, 4, 3, padding=1), (4, 5, 5))])
def test_input_pieces_are_whole_samples(layer, shape):
    view = LayerView("l", layer)
    x = torch.randn(shape)
    pieces = list(view.input_pieces(x, max_elements=40))  # one sample per piece
    assert len(pieces) == (7 if len(shape) in (3, 4) and shape[0] == 7 else 1)
    torch.testing.assert_close(torch.cat(pieces, dim=1), view.inputs(x))


def test_linear_flattens_leading_dims():
    lin = nn.Linear(8, 4)
    x = torch.randn(2, 5, 8)
    xs = LayerView("l", lin).inputs(x)
    assert xs.shape == (1, 10, 8) and xs.dtype == torch.float64
    torch.testing.assert_close(xs[0].float(), x.reshape(10, 8))


class Reversed(nn.Module):
    """Registers its layers in the reverse of the order it calls them, and calls `b` twice."""

    def __init__(self):
        super().__init__()
        self.c = nn.Linear(16, 8)
        self.b = nn.Linear(16, 16)
        self.a = nn.Linear(8, 16)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.c(self.b(torch.relu(self.b(self.a(x)))))))


def test_forward_order_and_capture():
    model = Reversed()
    x = torch.randn(10, 8)
    layers = [(n, m) for n, m in model.named_children() if n != "out"]
    assert [n for n, _ in forward_order(model, layers, x)] == ["a", "b", "c"]
    got = capture(model, model.b, x, 3, "in")
    assert got.shape == (20, 16)  # two calls per forward, over 4 chunks
    report = wanda_prune(model, x, "2:4", chunk=3)
    assert report.names == ["a", "b", "c"] and [r["rows"] for r in report.layers] == [10, 20, 10]
    assert report.method == "wanda" and report.pattern == "2:4" and report.seconds > 0
    assert "b (16, 16): 20 rows" in str(report)


def test_modes_restored_and_eval_during_calibration():
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.9), nn.Linear(16, 8), nn.Linear(8, 2)).train()
    model[2].eval()
    seen = []
    model[2].register_forward_pre_hook(lambda m, i: seen.append(model[1].training))
    sparsegpt_prune(model, torch.randn(20, 8), "2:4", blocksize=4)
    assert seen and not any(seen)  # dropout off while calibrating
    assert model.training and model[1].training and not model[2].training


class LM(nn.Module):
    """Token ids (n, T) -> embedding -> Linear -> ReLU -> Linear -> vocabulary logits."""

    def __init__(self, vocab=11, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.up = nn.Linear(d, 32)
        self.down = nn.Linear(32, d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, idx):
        return self.lm_head(self.down(torch.relu(self.up(self.emb(idx)))))


@pytest.mark.parametrize("prune", METHODS)
def test_language_model_tokens(prune):
    model = LM()
    ids = torch.randint(0, 11, (6, 7))
    report = prune(model, ids, "2:4")
    assert report.names == ["up", "down"] and report.layers[0]["rows"] == 42  # 6 sequences x 7 tokens
    assert model.lm_head.weight.ne(0).all()


@pytest.mark.parametrize("prune", METHODS)
def test_bad_calibration_data(prune):
    model = LM()
    before = model.up.weight.clone()
    with pytest.raises(ValueError, match=r"calib_x \(shape \(4, 7\), dtype torch.float32\) does not run .*token ids"):
        prune(model, torch.rand(4, 7), "2:4")  # floats where token ids are due
    with pytest.raises(ValueError, match="calib_x has no samples"):
        prune(model, torch.zeros(0, 7, dtype=torch.long), "2:4")
    with pytest.raises(ValueError, match="calib_x must be a torch.Tensor"):
        prune(model, [[1, 2, 3]], "2:4")
    mlp = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"calib_x \(shape \(5, 31\).*\(n, C, H, W\) images"):
        prune(mlp, torch.randn(5, 31), "2:4")
    assert torch.equal(model.up.weight, before)


@pytest.mark.parametrize("prune", METHODS)
def test_bad_pattern_and_layer(prune):
    name = prune.__name__.split("_")[0]
    mlp = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(20, 32)
    with pytest.raises(ValueError, match=f"{name} supports N:M and transposable N:M-T patterns.*not block8x8"):
        prune(mlp, x, "block8x8")
    with pytest.raises(ValueError, match="unknown pattern 'foo'"):
        prune(mlp, x, "foo")
    odd = nn.Sequential(nn.Linear(32, 30), nn.ReLU(), nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 4))
    before = odd[0].weight.clone()
    with pytest.raises(ValueError, match=r"layer '2' \(weight \(16, 30\)[^)]*\).*dim 1 has size 30, not divisible by 4"):
        prune(odd, x, "2:4")
    with pytest.raises(ValueError, match=r"layer '0' \(weight \(30, 32\)[^)]*\).*dim 0 has size 30, not divisible by 8"):
        prune(odd, x, "4:8-T")
    assert torch.equal(odd[0].weight, before)  # refused before any layer changed
    prune(odd, x, "2:4", filter_fn=lambda mod, n: n == "0")  # the filter leaves the misfit out
    with pytest.raises(ValueError, match="chunk"):
        prune(mlp, x, "2:4", chunk=0)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.head(self.mha(h, h, h)[0])


@pytest.mark.parametrize("prune", METHODS)
def test_uncalled_layer_named(prune):
    model = Attention()
    before = model.inp.weight.clone()
    with pytest.raises(ValueError, match=r"layer 'mha.out_proj' is not called in model\(calib_x\).*filter_fn"):
        prune(model, torch.randn(3, 5, 8), "2:4")
    assert torch.equal(model.inp.weight, before)
    prune(model, torch.randn(3, 5, 8), "2:4", filter_fn=lambda mod, n: n == "inp")


def test_conv_kernel_size_not_the_group_axis():
    """N:M groups run along input channels at one (co, kh, kw), as magnitude_prune's: 8 channels take 4:8."""
    from nmsparse.patterns import is_nm

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 25, 3))
    x = torch.randn(4, 3, 5, 5)
    for prune in METHODS:
        report = prune(model, x, "4:8")
        assert report.names == ["2"] and report.layers[0]["rows"] == 4 * 25
        assert is_nm(model[2].weight, 4, 8, dim=1)
    assert F.relu(model[0].weight).ne(0).any()  # stem (3 input channels) left dense
