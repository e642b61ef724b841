"""Dispatch: the Dispatcher's decisions with the timer mocked, use_triton, the CPU fallbacks of
kernels.ops, and the 2:4 wrappers' errors off-GPU. The "tile24" pattern's CPU emulation is
tested in test_kernels.py against a brute-force greedy and (on a GPU) against PyTorch's op."""

import json
import logging

import pytest
import torch

from nmsparse.kernels import dispatch, ops
from nmsparse.kernels import reference as ref
from nmsparse.kernels import semi_structured as ss
from nmsparse.kernels.dispatch import Decision, Dispatcher, triton_status, use_triton

CUDA = torch.cuda.is_available()


class FakeTimer:
    """timer(dense_fn, sparse_fn) -> fixed (dense_s, sparse_s); counts its calls."""

    def __init__(self, dense_s=2.0, sparse_s=1.0):
        self.dense_s, self.sparse_s, self.calls = dense_s, sparse_s, 0

    def __call__(self, dense_fn, sparse_fn):
        self.calls += 1
        return self.dense_s, self.sparse_s


class Counting:
    """A product function that counts its calls and returns a fixed tensor."""

    def __init__(self, value=None):
        self.value = torch.ones(4, 4) if value is None else value
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.value


def choose(d, op="mm", shape=(8, 8, 8), dtype=torch.float16, device="cpu", dense=None, sparse=None):
    return d.choose(op, shape, dtype, device, dense or Counting(), sparse or Counting())


# ------------------------------------------------------------------------------------------------
# Dispatcher

@pytest.mark.parametrize("dense_s,sparse_s,min_speedup,expect", [
    (2.0, 1.0, 1.05, "sparse"), (1.0, 2.0, 1.05, "dense"), (1.04, 1.0, 1.05, "dense"),
    (1.06, 1.0, 1.05, "sparse"), (1.0, 1.0, 1.0, "sparse"), (1.0, 1.0, 1.01, "dense")])
def test_faster_path_is_chosen(dense_s, sparse_s, min_speedup, expect):
    d = Dispatcher(timer=FakeTimer(dense_s, sparse_s), min_speedup=min_speedup)
    assert choose(d) == expect
    dec = d.decision("mm", (8, 8, 8), torch.float16, "cpu")
    assert dec.choice == expect and dec.dense_s == dense_s and dec.sparse_s == sparse_s
    assert dec.speedup == pytest.approx(dense_s / sparse_s)


def test_each_key_is_measured_once():
    timer = FakeTimer()
    d = Dispatcher(timer=timer)
    dense, sparse = Counting(), Counting()
    for _ in range(5):
        assert choose(d, dense=dense, sparse=sparse) == "sparse"
    assert timer.calls == 1
    assert dense.calls == 1 and sparse.calls == 1  # the correctness check, once
    choose(d, shape=(16, 8, 8))
    choose(d, dtype=torch.bfloat16)
    choose(d, op="other")
    assert timer.calls == 4
    choose(d, shape=(16, 8, 8))
    choose(d, dtype=torch.bfloat16)
    assert timer.calls == 4
    assert len(d.report()) == 4


def test_keys_name_the_device_model_and_normalise_types():
    k = Dispatcher.key("sdgp_dx_magnitude", torch.Size([8, 16, 4]), torch.bfloat16, torch.device("cpu"))
    assert k == "sdgp_dx_magnitude|8x16x4|bfloat16|cpu"
    assert Dispatcher.key("op", (8, 16, 4), torch.bfloat16, "cpu") == k.replace("sdgp_dx_magnitude", "op")


def test_wrong_sparse_result_means_dense_without_timing(caplog):
    timer = FakeTimer()
    d = Dispatcher(timer=timer)
    with caplog.at_level(logging.WARNING, logger="nmsparse.kernels"):
        assert choose(d, sparse=Counting(torch.ones(4, 4) * 1.5)) == "dense"
    assert timer.calls == 0
    dec = d.decision("mm", (8, 8, 8), torch.float16, "cpu")
    assert "relative error" in dec.reason and dec.dense_s is None
    assert "-> dense" in caplog.text and "relative error" in caplog.text
    # within the dtype's tolerance it is fine
    assert choose(d, op="close", sparse=Counting(torch.ones(4, 4) * 1.001)) == "sparse"
    d32 = Dispatcher(timer=FakeTimer())
    assert choose(d32, dtype=torch.float32, sparse=Counting(torch.ones(4, 4) * 1.001)) == "dense"


def test_failing_sparse_path_means_dense():
    def boom():
        raise RuntimeError("CUTLASS: shape not supported")

    timer = FakeTimer()
    d = Dispatcher(timer=timer)
    assert choose(d, sparse=boom) == "dense"
    assert "RuntimeError" in d.decision("mm", (8, 8, 8), torch.float16, "cpu").reason
    assert choose(d, sparse=boom) == "dense"  # cached: not retried
    d = Dispatcher(timer=lambda a, b: (_ for _ in ()).throw(RuntimeError("timer failed")), check=False)
    assert choose(d) == "dense"


def test_unchecked_dispatch_does_not_run_the_products():
    dense, sparse = Counting(), Counting()
    d = Dispatcher(timer=FakeTimer(), check=False)
    assert choose(d, dense=dense, sparse=sparse) == "sparse"
    assert dense.calls == 0 and sparse.calls == 0  # only the (fake) timer would run them


def test_disabled_dispatcher_is_dense_and_measures_nothing():
    timer = FakeTimer()
    d = Dispatcher(timer=timer, enabled=False)
    assert choose(d) == "dense" and timer.calls == 0 and d.report() == []


def test_json_cache_round_trip(tmp_path):
    path = tmp_path / "sub" / "dispatch.json"
    timer = FakeTimer(3.0, 1.0)
    d = Dispatcher(timer=timer, cache_path=path)
    choose(d)
    choose(d, op="slow", shape=(4, 4, 4))
    assert path.exists()
    data = json.loads(path.read_text())
    assert data["version"] == 1 and len(data["decisions"]) == 2
    assert data["decisions"]["mm|8x8x8|float16|cpu"]["choice"] == "sparse"
    # a new process: decisions come from the file, nothing is measured
    timer2 = FakeTimer(1.0, 3.0)
    d2 = Dispatcher(timer=timer2, cache_path=path)
    assert choose(d2) == "sparse" and choose(d2, op="slow", shape=(4, 4, 4)) == "sparse"
    assert timer2.calls == 0
    assert choose(d2, shape=(32, 8, 8)) == "dense" and timer2.calls == 1
    assert len(json.loads(path.read_text())["decisions"]) == 3
    # explicit save/load into a dispatcher without a file
    other = tmp_path / "copy.json"
    d2.save(other)
    d3 = Dispatcher(timer=FakeTimer())
    d3.load(other)
    assert d3.report() == d2.report()


def test_bad_cache_files_are_ignored(tmp_path, caplog):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="nmsparse.kernels"):
        d = Dispatcher(timer=FakeTimer(), cache_path=bad)
    assert d.report() == [] and "unreadable" in caplog.text
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"version": 0, "decisions": {"mm|8x8x8|float16|cpu": {"choice": "sparse"}}}))
    d = Dispatcher(timer=FakeTimer(1.0, 2.0), cache_path=old)
    assert choose(d) == "dense"  # the old file's answer was not used


def test_report_and_clear():
    d = Dispatcher(timer=FakeTimer(2.0, 1.0))
    choose(d)
    (row,) = d.report()
    assert row["op"] == "mm" and row["shape"] == "8x8x8" and row["dtype"] == "float16"
    assert row["choice"] == "sparse" and row["speedup"] == pytest.approx(2.0) and "faster" in row["reason"]
    d.clear()
    assert d.report() == []
    assert Decision("dense").speedup is None
    with pytest.raises(ValueError):
        Dispatcher(min_speedup=0)


def test_default_dispatcher_reads_cache_env(tmp_path, monkeypatch):
    path = tmp_path / "cache.json"
    monkeypatch.setenv(dispatch.CACHE_ENV, str(path))
    monkeypatch.setattr(dispatch, "_default", None)
    d = dispatch.default_dispatcher()
    assert d.cache_path == path and dispatch.default_dispatcher() is d


# ------------------------------------------------------------------------------------------------
# use_triton

def test_use_triton_is_false_on_cpu_and_says_why(monkeypatch):
    x = torch.randn(4, 8)
    assert not use_triton(x) and triton_status(x)[1] == "not a CUDA tensor"
    monkeypatch.setenv(dispatch.DISABLE_TRITON_ENV, "1")
    assert "NMSPARSE_DISABLE_TRITON" in triton_status(x)[1]


def test_use_triton_logic_on_a_cuda_tensor(monkeypatch):
    """The device check mocked to say CUDA: dtype, m, importability and the env var decide."""
    monkeypatch.setattr(dispatch, "_device_type", lambda x: "cuda")
    monkeypatch.setattr(dispatch, "_triton_importable", True)
    monkeypatch.delenv(dispatch.DISABLE_TRITON_ENV, raising=False)
    x = torch.randn(4, 8)
    assert use_triton(x) and use_triton(x, 4) and use_triton(x.half(), 32) and use_triton(x.bfloat16(), 8)
    assert not use_triton(x, 3) and "m=3" in triton_status(x, 3)[1]
    assert not use_triton(x, 64)
    assert not use_triton(x.double()) and "float64" in triton_status(x.double())[1]
    monkeypatch.setenv(dispatch.DISABLE_TRITON_ENV, "0")
    assert use_triton(x)
    monkeypatch.setenv(dispatch.DISABLE_TRITON_ENV, "1")
    assert not use_triton(x)
    monkeypatch.delenv(dispatch.DISABLE_TRITON_ENV)
    monkeypatch.setattr(dispatch, "_triton_importable", False)
    assert not use_triton(x) and "not installed" in triton_status(x)[1]
    assert not use_triton("not a tensor")


# ------------------------------------------------------------------------------------------------
# ops: the CPU behaviour nn/ relies on

def test_ops_fall_back_on_cpu(monkeypatch):
    g = torch.randn(4, 8, 3)
    native = ops.prune_grad_fast(g, 2, 4, "magnitude", 1)  # the compiled CPU kernel where it builds
    assert native is None or torch.equal(native, ref.prune_reference(g, 2, 4, "magnitude", 1))
    monkeypatch.setattr(ops, "prune_grad_native", lambda *a, **k: None)
    assert ops.prune_grad_fast(g, 2, 4, "magnitude", 1) is None
    w = torch.randn(16, 8, dtype=torch.float16)
    assert ops.sdgp_linear_dx(torch.randn(64, 16, dtype=torch.float16), w, 2, 4, "magnitude") is None
    assert not ops.sparse24_applies(torch.randn(64, 64, dtype=torch.float16),
                                    torch.randn(64, 64, dtype=torch.float16), 2, 4)


def test_ops_tile24_prune_grad_on_cpu_is_the_reference():
    g = torch.randn(2, 8, 4, 4)
    assert torch.equal(ops.tile24_prune_grad(g, 1), ref.tile24_prune_grad(g, 1))
    lin = torch.randn(16, 32, dtype=torch.bfloat16)
    assert torch.equal(ops.tile24_prune_grad(lin), ref.tile24_reference(lin))


# ------------------------------------------------------------------------------------------------
# 2:4 wrappers off-GPU

def test_semi_structured_wrappers_raise_clearly_without_cuda():
    x = torch.randn(64, 64, dtype=torch.float16)
    masks = torch.zeros(ss.tile_masks_shape(64, 64), dtype=torch.uint8)
    calls = {
        "to_sparse_24": lambda: ss.to_sparse_24(x),
        "prune_tile24": lambda: ss.prune_tile24(x),
        "tile24_raw": lambda: ss.tile24_raw(x),
        "apply_tile_masks": lambda: ss.apply_tile_masks(x, masks),
        "apply_tile_masks_dense": lambda: ss.apply_tile_masks_dense(x, masks),
        "cslt_compress": lambda: ss.cslt_compress(x),
        "cslt_mm": lambda: ss.cslt_mm(x, x),
        "sdgp_dx_separate": lambda: ss.sdgp_dx_separate(x, x),
        "sdgp_dx_tile24": lambda: ss.sdgp_dx_tile24(x, x),
        "Linear24": lambda: ss.linear24(x, x),
    }
    for name, call in calls.items():
        with pytest.raises(ss.SemiStructuredUnavailable) as err:
            call()
        msg = str(err.value)
        assert "CUDA" in msg and "sm80" in msg and "reference" in msg, (name, msg)
    assert issubclass(ss.SemiStructuredUnavailable, RuntimeError)
    with pytest.raises(TypeError):
        ss.require("x", "thing")


@pytest.mark.skipif(CUDA, reason="checks the message on a machine without CUDA")
def test_availability_says_why():
    ok, why = ss.availability()
    assert not ok and "no CUDA device" in why and not ss.is_available()


def test_backend_names_are_checked():
    with pytest.raises(ValueError, match="backend"):
        ss._backend_cls("tensorrt")


@pytest.mark.skipif(CUDA, reason="checks the message on a machine without CUDA")
def test_bench_gpu_exits_clearly_without_cuda():
    from nmsparse.bench import gpu

    with pytest.raises(SystemExit) as err:
        gpu.run()
    assert "needs a CUDA GPU" in str(err.value.code)


def test_bench_output_paths(tmp_path):
    from nmsparse.bench.gpu import _paths
    from nmsparse.bench.gpu_gemm import transposable_pattern

    assert _paths(None) is None
    assert _paths(tmp_path / "r.json") == (tmp_path / "r.json", tmp_path / "r.md")
    assert _paths(tmp_path / "r.md") == (tmp_path / "r.json", tmp_path / "r.md")
    assert _paths(tmp_path) == (tmp_path / "bench-gpu.json", tmp_path / "bench-gpu.md")
    from nmsparse.patterns.transposable import is_transposable

    assert is_transposable(transposable_pattern(8, 16, "cpu"), 2, 4)


def test_backend_choice_by_architecture(monkeypatch):
    """cuSPARSELt wherever torch has it; CUTLASS only on sm8x (torch's kernels refuse an H100/H200), with an error
    that names what runs there."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    arch = {"cap": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: arch["cap"])
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: True)
    assert ss._backend_cls("auto") is SparseSemiStructuredTensorCUSPARSELT
    with pytest.raises(ss.SemiStructuredUnavailable, match="sm8x GPUs only, this one is sm90: use backend='cusparselt'"):
        ss._backend_cls("cutlass")
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    with pytest.raises(ss.SemiStructuredUnavailable, match="a torch build with cuSPARSELt"):
        ss._backend_cls("auto")
    with pytest.raises(ss.SemiStructuredUnavailable, match="cuSPARSELt is not available"):
        ss._backend_cls("cusparselt")
    arch["cap"] = (8, 0)
    assert ss._backend_cls("auto") is SparseSemiStructuredTensorCUTLASS
    assert ss._backend_cls("cutlass") is SparseSemiStructuredTensorCUTLASS


def test_fused_tile_compress_is_refused_off_sm8x_with_what_works(monkeypatch):
    """On an H200 the tile op's compressed form disagreed with its own mask: off sm8x prune_tile24 refuses, and the
    dispatcher's tile24 route is skipped (fused_tile_runs) instead of tried."""
    arch = {"cap": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: arch["cap"])
    assert not ss.fused_tile_runs(None)
    with pytest.raises(ss.SemiStructuredUnavailable, match="sm8x GPUs only, this one is sm90: its masks"):
        ss._require_tile_compress(None)
    arch["cap"] = (8, 6)
    assert ss.fused_tile_runs(None)
    ss._require_tile_compress(None)  # no error


def test_prune_tile_sizes_follow_the_h200_measurements():
    """4096 elements per tile for strided 2:4 channels (NCHW), 2048 elsewhere; a set _TILE_ELEMS overrides."""
    from nmsparse.kernels import triton_prune as tp

    assert tp._tile_elems(4, 3136) == 4096 and tp._tile_elems(4, 1) == 2048 and tp._tile_elems(8, 1) == 2048
    assert tp._tile_elems(8, 3136) == 2048
    assert tp._blocks(1 << 20, 256, 4, 3136) == (1024, 1) and tp._blocks(1 << 20, 256, 4, 1) == (32, 16)
    old = tp._TILE_ELEMS
    try:
        tp._TILE_ELEMS = 8192
        assert tp._tile_elems(4, 1) == 8192
    finally:
        tp._TILE_ELEMS = old


def test_bench_gpu_saves_a_failed_section_at_once(monkeypatch, tmp_path):
    """A time-boxed run may be killed after any section: a section that raised is already in the files."""
    import json

    from nmsparse.bench import gpu

    def broken(*a, **k):
        raise RuntimeError("no copy today")

    monkeypatch.setattr(gpu, "bench_roofs", broken)
    saved = []  # (the errors, whether the run had ended) at each save
    monkeypatch.setattr(gpu, "_save", lambda results, out, quick: saved.append((json.loads(json.dumps(
        results["errors"], default=str)), "seconds" in results)) or gpu._paths(out))
    res = gpu.run(out=tmp_path / "b.json", sections=("roofs",), log=lambda *a: None, _allow_cpu=True)
    assert res["errors"][0]["section"] == "roofs" and "no copy today" in res["errors"][0]["error"]
    errors, ended = saved[0]
    assert errors and errors[0]["section"] == "roofs" and not ended  # saved when it failed, before the run's end
