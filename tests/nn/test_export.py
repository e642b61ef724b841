"""to_semi_structured: clear error without sparse cores, the right layers and operands at the boundary, GPU run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import nmsparse
from nmsparse import SparsityConfig, WeightNM, sparsify, to_semi_structured
from nmsparse.kernels import semi_structured as ss
from nmsparse.nn import export


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def test_cpu_is_a_clear_error_and_leaves_the_model(monkeypatch):
    monkeypatch.setattr(ss, "availability", lambda device=None: (False, "no CUDA device (test)"))
    model = sparsify(_model(), SparsityConfig(weight=WeightNM(2, 4)))
    with pytest.raises(ss.SemiStructuredUnavailable, match="no CUDA device.*block-sparse CPU runtime"):
        to_semi_structured(model)
    assert hasattr(model[0], "parametrizations")  # untouched


def test_boundary_converts_the_2_4_linears_with_their_masked_weights(monkeypatch):
    monkeypatch.setattr(ss, "availability", lambda device=None: (True, ""))
    seen = []
    monkeypatch.setattr(ss, "to_sparse_24", lambda w, backend="auto": seen.append(w.clone()) or w.clone())
    model = sparsify(_model(), SparsityConfig(weight=WeightNM(2, 4)))
    # CPU float32 weights: the placement check names the layer and the fix, before any change
    with pytest.raises(ValueError, match="layer '0'.*float16 or bfloat16 CUDA"):
        to_semi_structured(model)
    assert seen == [] and hasattr(model[0], "parametrizations")  # refused before any change
    model = sparsify(_model(), SparsityConfig(weight=WeightNM(2, 4)))
    model.eval()
    with torch.no_grad():
        masked = [model[0].weight.clone(), model[2].weight.clone()]
    monkeypatch.setattr(export, "placement_error", lambda name, w: None)
    assert to_semi_structured(model) == ["0", "2"]  # the classifier (10 outputs, dense) stays
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(seen, masked))
    assert not model[0].weight.requires_grad and model[4].weight.requires_grad
    assert not hasattr(model[0], "parametrizations")  # squashed first


@pytest.mark.gpu
@pytest.mark.skipif(not ss.availability()[0], reason="needs 2:4 sparse tensor cores (CUDA sm80+)")
def test_gpu_outputs_match_the_dense_masked_model():
    model = sparsify(_model(), SparsityConfig(weight=WeightNM(2, 4))).cuda().half().eval()
    x = torch.randn(128, 64, device="cuda", dtype=torch.half)
    with torch.no_grad():
        want = model(x)
        names = to_semi_structured(model)
        got = model(x)
    assert names == ["0", "2"] and isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
