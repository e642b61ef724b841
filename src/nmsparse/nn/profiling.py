"""Profiler scopes around nmsparse's hot paths, so `torch.profiler` shows where a training step's time goes.

``scope(MASK)`` wraps a mask (re)computation, ``scope(MASKING)`` the multiply W * mask (and SR-STE's
backward), ``scope(GRAD_PRUNE)`` SDGP's pruning of the output gradient. Each is a
``torch.profiler.record_function`` only while a profiler records: with none running,
record_function still costs tens of microseconds per call, the check about one. Under
``torch.compile`` the scope is a no-op that does not break the graph (Dynamo would drop a
record_function anyway, and its profiler check is a graph break).
"""

from __future__ import annotations

import contextlib

import torch
from torch.profiler import record_function

__all__ = ["MASK", "MASKING", "GRAD_PRUNE", "SCOPES", "scope"]

MASK = "nmsparse.mask"
MASKING = "nmsparse.masking"
GRAD_PRUNE = "nmsparse.grad_prune"
SCOPES = (MASK, MASKING, GRAD_PRUNE)


_NO_SCOPE = contextlib.nullcontext()  # reentrant: one instance serves every call
_compiling = torch.compiler.is_compiling
_profiling = torch.autograd._profiler_enabled


def scope(name: str):
    """record_function(name) while a torch profiler records; otherwise (and while compiling) a no-op context."""
    if _compiling() or not _profiling():
        return _NO_SCOPE
    return record_function(name)
