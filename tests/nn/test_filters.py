"""filter_fn in torchao's order (module, name); the older (name, module) still works, with a DeprecationWarning."""

from __future__ import annotations

import warnings

import pytest
from torch import nn

from nmsparse import SparsityConfig, WeightNM, sparsify, sparsity_report
from nmsparse.nn.registry import handler_for


def _net():
    return nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 16, 3), nn.Flatten(), nn.Linear(16, 16), nn.Linear(16, 4))


def _chosen(filter_fn):
    return [r["layer"] for r in sparsity_report(sparsify(_net(), SparsityConfig(weight=WeightNM(2, 4)), filter_fn))]


def test_torchao_order_needs_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _chosen(lambda module, name: isinstance(module, nn.Conv2d)) == ["0", "1"]
        assert _chosen(lambda m, fqn: fqn == "3") == ["3"]


@pytest.mark.parametrize("old", [
    lambda name, module: name == "1",  # named: recognised from the signature
    lambda a, b: a.startswith("1"),    # torchao's order raises: the old one is meant
    lambda n, m: n == "1",             # torchao's order selects nothing, the old one selects a layer
])
def test_the_old_order_still_works_and_warns(old):
    with pytest.warns(DeprecationWarning, match=r"filter_fn\(module, name\)"):
        assert _chosen(old) == ["1"]


def test_a_filter_selecting_nothing_names_the_order():
    with pytest.raises(ValueError, match=r"no layer selected.*filter_fn\(module, name\)"):
        _chosen(lambda module, name: False)


def test_an_unregistered_config_type_is_a_clear_error():
    with pytest.raises(TypeError, match="no sparsity handler for dict; registered config types: WeightNM"):
        handler_for({"n": 2})
