"""The block-sparse compiler: compact files, plans, the cost models, profiles, bad inputs, the CLI entry."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from nmsparse.compile import (IncompatibleLayer, LayerSpec, NoSparseLayers, ProfileError, aie2_table, compile_model,
                              compile_to_dir, detect_format, list_targets, load_compact, load_compact_state,
                              load_target, plan_aie2, time_series)
from nmsparse.prune import prune_blocks
from nmsparse.compile.cost import (WeightPattern, cpu_dense_time, cpu_sparse_time, estimate_gpu, estimate_layer,
                                   kernel_work)
from nmsparse.compile.layers import LayerFormat, block_grid
from nmsparse.compile.runtime import BlockSparseConv2d, decide
from nmsparse.formats import save
from nmsparse.formats.block import BlockCompressed
from nmsparse.formats.nm import NMCompressed
from nmsparse.patterns import nm_mask


class Net(nn.Module):
    """Stem (dense, 3 channels), a block-sparse conv, an N:M conv, a strided conv, BN, a Linear pair."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(32)
        self.nm = nn.Conv2d(32, 32, 1)
        self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn(self.block(x)))
        x = torch.relu(self.nm(x))
        x = self.down(x).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def sparse_net(seed=0):
    torch.manual_seed(seed)
    net = Net().eval()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.running_var.uniform_(0.5, 2)
        prune_blocks(net, 0.5)  # stem stays dense (first conv); nm, fc2 (10 outputs) do not divide / are re-set
        net.nm.weight.copy_(torch.randn_like(net.nm.weight) * nm_mask(net.nm.weight, 2, 4, dim=1))
    return net


SHAPE = (1, 3, 8, 8)


def test_formats_detected_per_layer():
    c = compile_model(sparse_net(), "aie2", SHAPE)
    kinds = {p.name: p.format.kind for p in c.layers}
    assert kinds == {"stem": "dense", "block": "block", "nm": "nm", "down": "block", "fc1": "block", "fc2": "dense"}
    blk = next(p for p in c.layers if p.name == "block")
    assert blk.format.zero_block_fraction == pytest.approx(0.5)
    nm = next(p for p in c.layers if p.name == "nm")
    assert (nm.format.n, nm.format.m, nm.format.fits_24) == (2, 4, True)
    assert isinstance(c.compact["block.weight"], BlockCompressed)
    assert isinstance(c.compact["nm.weight"], NMCompressed)
    assert isinstance(c.compact["stem.weight"], torch.Tensor)
    assert blk.stored_bytes < blk.dense_bytes


def test_compact_file_round_trip_is_bit_exact(tmp_path):
    net = sparse_net()
    c = compile_model(net, "aie2", SHAPE)
    c.save(tmp_path, charts=False)
    state, info = load_compact_state(tmp_path / "model.safetensors")
    orig = net.state_dict()
    assert set(state) == set(orig)
    for k, v in orig.items():
        got = state[k]
        assert got.dtype == v.dtype and got.shape == v.shape, k
        if v.is_floating_point():
            # every stored value bit for bit; a dropped -0.0 (from w * mask) reads back as +0.0
            assert torch.equal((v + 0.0).view(torch.int32), got.view(torch.int32)), k
        else:
            assert torch.equal(v, got), k
    assert info["layers"]["block"]["format"] == "block"
    assert info["input_shape"] == list(SHAPE)
    tot = c.totals()
    assert tot["file_bytes"] < tot["dense_file_bytes"]
    # the reloaded weights run the same model
    fresh = Net().eval()
    fresh.load_state_dict(state)
    x = torch.randn(SHAPE)
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


def test_parametrized_model_is_squashed_on_a_copy():
    from nmsparse import SparsityConfig, WeightBlock, sparsify

    torch.manual_seed(0)
    net = Net()
    sparsify(net, SparsityConfig(weight=WeightBlock((8, 8), 0.5)))
    net.eval()
    c = compile_model(net, "gpu", SHAPE)
    assert any(p.format.kind == "block" for p in c.layers)
    from torch.nn.utils import parametrize

    assert parametrize.is_parametrized(net.block, "weight")  # the caller's model is untouched


def test_corrupted_and_foreign_compact_files(tmp_path):
    c = compile_model(sparse_net(), "aie2", SHAPE)
    c.save(tmp_path, charts=False)
    path = tmp_path / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # a byte of tensor data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*CRC-32"):
        load_compact(bad)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_compact(tmp_path / "missing.safetensors")
    foreign = tmp_path / "plain.safetensors"
    save(foreign, {"w": torch.ones(3)})
    with pytest.raises(ValueError, match="not a compiled model"):
        load_compact(foreign)
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        load_compact(trunc)


# --- plans ---------------------------------------------------------------------------------------

def small_aie2(**kw):
    base = load_target("aie2").params | {"name": "t", "kind": "aie2"}
    return load_target({**base, **kw})


PLAN_CASES = [
    LayerSpec.conv("c3", 64, 128, 3, 20),
    LayerSpec.conv("c3s2", 64, 64, 3, 21, stride=2),
    LayerSpec.conv("c1", 128, 64, 1, 9),
    LayerSpec.conv("c17", 32, 48, (1, 7), 17),
    LayerSpec.linear("fc", 256, 96, tokens=5),
]


@pytest.mark.parametrize("spec", PLAN_CASES, ids=lambda s: s.name)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("memtile_kib", [512, 8, 2])
def test_plan_subvolumes_fit_and_cover_the_layer(spec, sparse, memtile_kib):
    tgt = small_aie2(memtile_kib=memtile_kib, array=[2, 2], core_memory_kib=2)
    g = torch.Generator().manual_seed(1)
    grid = (torch.rand(spec.co // 8, spec.ci // 8, generator=g) < 0.5) if sparse else None
    pat = WeightPattern.for_layer(spec, (8, 8), grid)
    t, plan = plan_aie2(spec, pat, tgt.params)
    subs = plan["subvolumes"]
    assert len(subs) == plan["iterations"] == math.prod(plan["tiles"].values())
    cover = np.zeros((spec.w_out, spec.co, spec.ci), dtype=int)
    for s in subs:
        assert s.memory_bytes <= plan["memory_capacity"]
        cover[s.w[0]:s.w[1], s.co[0]:s.co[1], s.ci[0]:s.ci[1]] += 1
    assert (cover == 1).all()  # every (output column, output channel, input channel) exactly once
    kept = int(grid.sum()) if sparse else (spec.co // 8) * (spec.ci // 8)
    layer_macs = spec.batch * spec.h_out * spec.w_out * kept * 64 * spec.kh * spec.kw
    assert sum(s.macs for s in subs) == layer_macs == plan["macs"]
    assert sum(s.kept_blocks for s in subs) == kept * plan["tiles"]["w"]
    assert sum(s.out_bytes for s in subs) == spec.out_numel  # int8 outputs written once
    assert t == pytest.approx(time_series([(s.load_s, s.compute_s, s.write_s) for s in subs]))
    if memtile_kib == 2 and spec.name == "c3":
        assert plan["tiles"]["w"] == spec.w_out and plan["tiles"]["co"] > 1  # W split first, then Co


def test_layer_that_cannot_fit_is_a_clear_error():
    from nmsparse.compile import PlanError

    spec = PLAN_CASES[0]
    with pytest.raises(PlanError, match=r"layer 'c3' \(Conv 64->128 3x3 @20x20\): even a sub-volume of one output "
                                        r"column.*2048 bytes of memory tiles of a 2x2 array"):
        plan_aie2(spec, WeightPattern.for_layer(spec, (8, 8)), small_aie2(memtile_kib=1, array=[2, 2]).params)


def test_time_series_rule():
    assert time_series([(1.0, 2.0, 3.0)]) == 6.0  # one step: nothing overlaps
    assert time_series([(1.0, 2.0, 3.0), (4.0, 1.0, 1.0)]) == 7.0
    assert time_series([(1.0, 5.0, 2.0)] * 4) == 20.0  # max(load, compute, write) x iterations


def tiny_profile(memtile_bytes):
    return small_aie2(array=[1, 1], memtile_kib=memtile_bytes / 1024, core_memory_kib=64, double_buffer=False,
                      ddr_channels_per_column=1, ddr_load_gbps=4.0, ddr_write_gbps=8.0, core_load_gbps=4.0,
                      core_write_gbps=4.0, clock_ghz=1.0, macs_per_cycle=256, dtype_bytes=1, acc_bytes=4)


def test_cost_model_by_hand_two_iterations():
    # 1x1 conv, 16 -> 16 channels, 1 x 4 outputs; memory for 2 output columns at a time:
    # footprint = in (wt x 16) + weights 256 + out (wt x 16) = 256 + 32 wt -> 320 bytes fits wt = 2.
    spec = LayerSpec.conv("t", 16, 16, 1, (1, 4))
    t, plan = plan_aie2(spec, WeightPattern.for_layer(spec, (8, 8)), tiny_profile(320).params)
    assert plan["tiles"] == plan["rule_tiles"] == {"w": 2, "co": 1, "ci": 1}  # 4 W tiles would be slower
    s0, s1 = plan["subvolumes"]
    assert (s0.in_bytes, s0.weight_bytes, s0.out_bytes, s0.macs) == (32, 256, 32, 512)
    assert (s1.in_bytes, s1.weight_bytes, s1.out_bytes) == (32, 0, 32)  # weights stay resident
    assert s0.load_s == pytest.approx(288 / 4e9) and s1.load_s == pytest.approx(32 / 4e9)
    assert s0.write_s == pytest.approx(32 / 8e9)
    # the core's piece (1 x 2 outputs) fits core memory whole, but two 1-column steps overlap:
    # max(load (16 + 256) at 4 GB/s, 256 MACs at 256/cycle, write 16 at 4 GB/s) + max(16 / 4, 1 ns, 16 / 4)
    # = 68 + 4 ns, against 288 / 4 + 2 + 32 / 4 = 82 ns in one step
    core = 272 / 4e9 + 16 / 4e9
    assert plan["cores"]["core_tiles"]["w"] == 2
    assert s0.compute_s == pytest.approx(core) and s1.compute_s == pytest.approx(core)
    assert t == pytest.approx(2 * max(288 / 4e9, core, 32 / 8e9))  # 144 ns


def test_cost_model_by_hand_single_step_and_sparse():
    spec = LayerSpec.conv("t", 16, 16, 1, (1, 4))
    prof = tiny_profile(4096).params
    t1, plan = plan_aie2(spec, WeightPattern.for_layer(spec, (8, 8)), prof, tiles=(1, 1, 1))
    assert plan["iterations"] == 1
    load, write = (64 + 256) / 4e9, 64 / 8e9
    # the core's 4 columns in 2 steps: max((32 + 256) / 4, 2, 32 / 4) + max(32 / 4, 2, 32 / 4) = 80 ns
    # (one step: 100 ns; 4 steps: 68 + 3 x 4 = 80 ns too, and the fewer splits win a tie)
    core = (32 + 256) / 4e9 + 32 / 4e9
    assert plan["cores"]["core_tiles"]["w"] == 2
    assert t1 == pytest.approx(load + core + write)  # 168 ns: one step, nothing overlaps
    # the rule's fewest W splits (1) is not the fastest: 2 steps overlap load and compute
    t, plan = plan_aie2(spec, WeightPattern.for_layer(spec, (8, 8)), prof)
    assert plan["rule_tiles"]["w"] == 1 and plan["tiles"]["w"] == 2
    assert t == pytest.approx(2 * max((32 + 256) / 4e9, 72e-9, 32 / 8e9)) and t < t1  # 144 ns
    grid = torch.tensor([[True, False], [False, True]])
    ts, ps = plan_aie2(spec, WeightPattern.for_layer(spec, (8, 8), grid), prof)
    # 2 kept blocks of 64 bytes + a 1-byte bitmask (4 blocks) beats 2-byte indices (4 bytes)
    assert ps["subvolumes"][0].weight_bytes == 2 * 64 + 1
    assert ps["macs"] == 512 and ts < t


@pytest.mark.parametrize("array", [(2, 2), (4, 4)])
def test_aie2_sparser_layer_is_never_estimated_slower(array):
    # VGG-16's features.21 shape; before the W split count was chosen by time, 50% kept on 2x2 gave
    # 6.9 or 9.8 ms depending on the layout (6 W tiles instead of 7 spread unevenly over 4 cores)
    spec = LayerSpec.conv("features.21", 512, 512, 3, 28)
    tgt = load_target("aie2", array=array)
    order = torch.randperm(64 * 64, generator=torch.Generator().manual_seed(0))
    times = []
    for kept in range(round(0.4 * 4096), round(0.6 * 4096) + 1, 64):
        keep = torch.zeros(64 * 64, dtype=torch.bool)
        keep[order[:kept]] = True  # each sparser grid zeroes more blocks of the denser one
        d = kept / 4096
        est = estimate_layer(spec, LayerFormat("block", 1 - d, 1 - d, d), tgt, keep.view(64, 64),
                             with_subvolumes=False)
        times.append(est.time_s)
        assert est.time_s < est.dense_time_s
    for sparser, denser in zip(times, times[1:]):
        assert sparser <= denser * (1 + 1e-9)
    assert times[0] < times[-1]  # and sparsity does pay


def test_gpu_roofline_and_cpu_model_formulas():
    gpu = load_target("gpu")
    p = gpu.params
    spec = LayerSpec.linear("fc", 1024, 1024, tokens=1)
    est = estimate_gpu(spec, None, p)
    bytes_ = (1024 + 1024 + 1024 * 1024) * 2
    want = p["launch_overhead_us"] * 1e-6 + max(2 * 1024 * 1024 / (p["dense_tflops"] * 1e12 * p["efficiency"]),
                                                bytes_ / (p["memory_gbps"] * 1e9))
    assert est.time_s == pytest.approx(want)
    big = LayerSpec.conv("c", 512, 512, 3, 56)
    nm = estimate_gpu(big, LayerFormat("nm", 0.5, n=2, m=4, fits_24=True), p)
    assert 1.0 < nm.speedup <= p["sparse_24_tflops"] * p["sparse_efficiency"] / (p["dense_tflops"] * p["efficiency"]) + 1e-9
    small = estimate_gpu(LayerSpec.linear("s", 64, 64), LayerFormat("nm", 0.5, n=2, m=4, fits_24=True), p)
    assert small.speedup == 1.0 and "runs dense" in small.notes[0]
    # cpu: hand-computed from the profile's formulas
    prof = {"dense": {"overhead_us": 1.0, **{f"{k}_{u}": 10.0 for k in ("conv1x1", "convkxk", "linear", "gemv")
                                               for u in ("gmacs", "weight_gbps")}, "gemv_dram_gbps": 1.0},
            "sparse": {"overhead_us": 2.0, "copy_gfloats": 1.0, "fetch_gbps": 2.0, "store_gfloats": 4.0,
                       "gmacs_1x1": 100.0,
                       "gmacs_kxk": 50.0, "gblocks_1x1": 1.0, "gblocks_kxk": 1.0, "l2_miss_gbps": 1.0,
                       "gemv_gmacs": 4.0, "gemv_weight_gbps": 8.0, "gemv_dram_gbps": 1.0},
            "memory_gbps": 10.0, "cache": {"l2_kib": 1024, "llc_kib": 32768}}
    # 3x3, padding 1 at 10x10: the direct grid is 10 rows of Wq = 12 lanes, walked up to the last real
    # output: 9 * 12 + 10 = 118 lanes = chunks of 48 + 48 + 22 -> 3 + 3 + 2 vectors; the padded copy is
    # 16 channels x 12 x 12; each chunk reads 16 x 3 input rows of 48 + 2 floats.
    conv = LayerSpec.conv("c", 16, 16, 3, 10)
    w = kernel_work(conv, 2)
    assert w == {"macs": 2 * 9 * 64 * 100, "weight_bytes": 2 * 9 * 256, "lane_macs": 2 * 9 * 64 * 16 * 8,
                 "block_visits": 2 * 9 * 3, "copy_floats": 16 * 12 * 12, "fetch_bytes": 3 * 48 * 50 * 4,
                 "out_floats": 16 * 100, "l2_miss_bytes": 0, "llc_miss_bytes": 0}
    want = (2e-6 + w["copy_floats"] / 1e9 + w["fetch_bytes"] / 2e9 + 1600 / 4e9 + w["lane_macs"] / 50e9
            + w["block_visits"] / 1e9)
    assert cpu_sparse_time(conv, 2, prof) == pytest.approx(want)
    assert cpu_dense_time(conv, prof) == pytest.approx(1e-6 + conv.macs / 10e9 + conv.weight_numel * 4 / 10e9)
    fc = LayerSpec.linear("fc", 64, 32, tokens=2)  # gemv: rows x kept MACs + kept bytes
    assert cpu_sparse_time(fc, 4, prof) == pytest.approx(2e-6 + 2 * 4 * 64 / 4e9 + 4 * 256 / 8e9)


def test_cpu_target_fallback_with_mocked_timer():
    net = sparse_net()
    slow = compile_model(net, "cpu", SHAPE, timer=lambda fns: [1.0, 2.0])  # sparse measured slower
    for p in slow.layers:
        if p.format.kind == "block":
            assert p.decision == "dense" and p.measured == {"dense_s": 1.0, "sparse_s": 2.0, "decision": "dense"}
            assert any("fallback to dense" in n for n in p.notes)
            assert p.estimate.time_s == p.estimate.dense_time_s
    assert slow.sparse_layers == []
    assert not any(isinstance(m, BlockSparseConv2d) for m in slow.executable(backend="torch").modules())
    fast = compile_model(net, "cpu", SHAPE, timer=lambda fns: [2.0, 1.0])
    assert set(fast.sparse_layers) == {"block", "down", "fc1"}
    assert "fallback to dense" in slow.report() and "measured sparse" in slow.report()
    assert decide(nn.Identity(), nn.Identity(), torch.ones(1), timer=lambda fns: [3.0, 3.0])["decision"] == "dense"


# --- bad inputs ----------------------------------------------------------------------------------

def test_no_sparse_layers_message_and_dense_baseline():
    net = Net().eval()
    with pytest.raises(NoSparseLayers, match=r"no sparse layer in Net: checked 6 Conv2d/Linear layers \(stem") as e:
        compile_model(net, "aie2", SHAPE)
    assert "--allow-dense" in str(e.value) and "--prune" in str(e.value)
    c = compile_model(net, "aie2", SHAPE, allow_dense=True)
    assert all(p.decision == "dense" for p in c.layers) and c.totals()["speedup"] == pytest.approx(1.0)


def test_blocks_that_do_not_divide_a_layer():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3)
            self.b = nn.Conv2d(16, 12, 1)

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(0)
    m = Odd()
    with torch.no_grad():
        m.b.weight.mul_((torch.rand_like(m.b.weight) > 0.6).float())  # 60% scattered zeros
    with pytest.raises(IncompatibleLayer, match=r"layer 'b' has weight shape \(12, 16, 1, 1\).*not divisible by the "
                                                r"block 8x8.*on_incompatible='dense'"):
        compile_model(m, "aie2", (1, 3, 6, 6), allow_dense=True)
    c = compile_model(m, "aie2", (1, 3, 6, 6), allow_dense=True, on_incompatible="dense")
    assert c.layers[1].format.kind == "dense" and "stored dense" in c.layers[1].format.reason


def test_model_input_and_name_errors(tmp_path):
    with pytest.raises(ValueError, match=r"failed on an example input of shape \(1, 5, 8, 8\)"):
        compile_model(sparse_net(), "aie2", (1, 5, 8, 8))
    with pytest.raises(ValueError, match="did you mean 'resnet50'"):
        compile_to_dir("resnet5", "aie2", tmp_path)
    with pytest.raises(ValueError, match="aie2 targets only"):
        compile_to_dir("small_cnn", "gpu", tmp_path, prune=0.5, array="2x2")
    with pytest.raises(ValueError, match="ROWSxCOLS"):
        compile_to_dir("small_cnn", "aie2", tmp_path, prune=0.5, array="4by4")
    with pytest.raises(TypeError, match="nn.Module"):
        compile_model("resnet50", "aie2", SHAPE)


# --- profiles ------------------------------------------------------------------------------------

def test_shipped_profiles_load():
    assert {"aie2", "gpu", "cpu"} <= set(list_targets())
    for name in ("aie2", "gpu", "cpu"):
        t = load_target(name)
        assert t.kind == name and t.params["block"] == [8, 8]
    assert load_target("aie2", array=(8, 8)).label == "aie2 (8x8)"


def write_profile(tmp_path, **changes):
    data = yaml.safe_load(open(load_target("aie2").source))
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_user_profile_and_profile_errors(tmp_path):
    good = write_profile(tmp_path, name="mine", array=[2, 2])
    assert load_target(good).label == "mine (2x2)"
    with pytest.raises(ProfileError, match=r"unknown target 'aie3'; did you mean 'aie2'\? Known targets: aie2, cpu, gpu"):
        load_target("aie3")
    with pytest.raises(ProfileError, match=r"unknown target 'zzz'\. Known targets: aie2, cpu, gpu"):
        load_target("zzz")
    with pytest.raises(ProfileError, match=r"mine\.yaml: missing key 'ddr_load_gbps' \(an aie2 profile needs"):
        load_target(write_profile(tmp_path, ddr_load_gbps=None))
    with pytest.raises(ProfileError, match=r"mine\.yaml: key 'clock_ghz' must be a number > 0, got 'fast' \(str\)"):
        load_target(write_profile(tmp_path, clock_ghz="fast"))
    with pytest.raises(ProfileError, match=r"key 'array' must be a list of two integers"):
        load_target(write_profile(tmp_path, array=[4]))
    with pytest.raises(ProfileError, match=r"unknown key 'memtile_kb' for kind 'aie2'; did you mean 'memtile_kib'"):
        load_target(write_profile(tmp_path, memtile_kb=512))
    with pytest.raises(ProfileError, match=r"key 'kind' must be one of"):
        load_target(write_profile(tmp_path, kind="fpga"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nkind: [unclosed\n")
    with pytest.raises(ProfileError, match=r"bad\.yaml is not valid YAML"):
        load_target(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ProfileError, match=r"bad\.yaml: expected a YAML mapping"):
        load_target(bad)
    with pytest.raises(ProfileError, match=r"profile file .*nope\.yaml does not exist"):
        load_target(tmp_path / "nope.yaml")
    cpu = yaml.safe_load(open(load_target("cpu").source))
    del cpu["sparse"]["gmacs_kxk"]
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump(cpu))
    with pytest.raises(ProfileError, match=r"cpu\.yaml: missing key 'sparse\.gmacs_kxk'"):
        load_target(tmp_path / "cpu.yaml")


def test_cpu_profile_rejects_blocks_other_than_8x8(tmp_path):
    # The cpu cost model and native kernel only do 8x8: a 16x16 cpu profile must not give estimates.
    cpu = yaml.safe_load(open(load_target("cpu").source))
    cpu["block"] = [16, 16]
    path = tmp_path / "cpu16.yaml"
    path.write_text(yaml.safe_dump(cpu))
    with pytest.raises(ProfileError, match=r"cpu16\.yaml: key 'block' must be \[8, 8\] for a cpu profile, "
                                           r"got \[16, 16\]: the cpu kernels run 8x8 blocks only"):
        load_target(path)
    with pytest.raises(ProfileError, match=r"cpu kernels run 8x8 blocks only"):
        load_target("cpu", block=(8, 16))
    # other kinds keep accepting other block sizes
    assert load_target("aie2", block=(16, 16)).params["block"] == [16, 16]


def test_detect_format_variants():
    w = torch.randn(16, 16, 3, 3)
    assert detect_format("x", w).kind == "dense"
    w24 = torch.randn(16, 16) * nm_mask(torch.randn(16, 16), 2, 4, dim=1)
    f = detect_format("x", w24)
    assert (f.kind, f.n, f.m, f.fits_24) == ("nm", 2, 4, True)
    w48 = torch.randn(16, 16) * nm_mask(torch.randn(16, 16), 4, 8, dim=1)
    assert detect_format("x", w48).m == 8
    wb = w.clone()
    wb[:8, 8:] = 0
    f = detect_format("x", wb)
    assert f.kind == "block" and f.zero_block_fraction == 0.25 and block_grid(wb, (8, 8)).sum() == 3
    unstructured = w * (torch.rand_like(w) > 0.5)
    assert "unstructured" in detect_format("x", unstructured).reason


# --- directory output, CLI, AIE2 table -----------------------------------------------------------

def test_compile_to_dir_writes_everything(tmp_path):
    pytest.importorskip("matplotlib")
    c, paths = compile_to_dir(sparse_net(), "aie2", tmp_path / "out", input_shape=SHAPE, array="2x2")
    for key in ("compact", "plan", "report", "chart_layers", "chart_network"):
        assert (tmp_path / "out").joinpath(paths[key].split("/")[-1]).exists(), key
    plan = json.load(open(paths["plan"]))
    assert plan["target"]["array"] == [2, 2] and len(plan["layers"]) == 6
    assert plan["layers"][1]["estimate"]["subvolumes"][0]["macs"] > 0
    text = open(paths["report"]).read()
    assert "| `block` |" in text and "Whole network" in text and "speed-up" in text


def test_report_format_column_says_blocks_kept():
    # --prune 0.5 zeroes half the blocks: the column must say the other half is kept, with the block size
    c = compile_model(sparse_net(), "aie2", SHAPE)
    text = c.report()
    assert "| block 8x8, 50% kept |" in text and "| 2:4 |" in text
    assert LayerFormat("block", 0.75, 0.75, 0.25).label == "block, 25% kept"


def test_report_links_charts_and_removes_stale_ones(tmp_path):
    pytest.importorskip("matplotlib")
    from nmsparse.compile.report import CHART_FILES, write_report

    c = compile_model(sparse_net(), "aie2", SHAPE)
    out = tmp_path / "out"
    paths = write_report(c, out, charts=True)
    text = (out / "report.md").read_text()
    for key, name in CHART_FILES.items():
        assert (out / name).is_file() and paths[key] == str(out / name)
        assert f"]({name})" in text  # a relative link, so the directory can move
    other = out / "notes.png"
    other.write_bytes(b"not ours")
    paths = write_report(c, out, charts=False)
    text = (out / "report.md").read_text()
    assert set(paths) == {"report"} and "## Charts" not in text and ".png" not in text
    assert not any((out / name).exists() for name in CHART_FILES.values())
    assert other.read_bytes() == b"not ours"  # only the chart file names this report writes are removed


def compile_main(argv):
    from nmsparse.cli import main

    return main(["compile", *argv])


def test_compile_without_matplotlib_says_how_to_get_charts(tmp_path, capsys, no_matplotlib):
    assert compile_main(["small_cnn", "--prune", "0.5", "--target", "gpu", "--out", str(tmp_path / "g")]) == 0
    hints = [line for line in capsys.readouterr().out.splitlines() if "matplotlib" in line]
    assert len(hints) == 1 and "pip install 'nmsparse[plot]'" in hints[0]
    assert "pip install 'nmsparse[plot]'" in (tmp_path / "g" / "report.md").read_text()
    assert not list((tmp_path / "g").glob("*.png"))


def test_cli_entry(tmp_path, capsys):
    assert compile_main(["small_cnn", "--prune", "0.5", "--target", "gpu", "--out", str(tmp_path / "g"),
                         "--no-charts"]) == 0
    assert "2 of 4 layers sparse" in capsys.readouterr().out
    assert compile_main(["small_cnn", "--out", str(tmp_path / "x")]) == 2
    assert "no sparse layer" in capsys.readouterr().err
    assert compile_main(["small_cnn", "--prune", "0.5", "--target", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "Known targets: aie2, cpu, gpu" in capsys.readouterr().err


@pytest.mark.slow
def test_aie2_table_rows():
    rows = aie2_table(arrays=((2, 2), (4, 4)))
    assert [(r["network"], r["array"]) for r in rows][:2] == [("resnet50", "2x2"), ("resnet50", "4x4")]
    for r in rows:
        assert 1.0 < r["speedup"] < 2.5 and 1.0 < r["speedup_rule_only"] <= r["speedup"] + 1e-9
        assert r["sparse_mb_moved"] < r["dense_mb_moved"]
    by = {(r["network"], r["array"]): r for r in rows}
    for net in ("resnet50", "inception_v3", "vgg16"):
        assert by[(net, "4x4")]["dense_ms"] < by[(net, "2x2")]["dense_ms"]
    assert by[("resnet50", "4x4")]["published_note"].startswith("10.77")
