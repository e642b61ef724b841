"""Triton pruning kernels vs nmsparse.kernels.reference; the references themselves; 2:4 sparse cores.

The kernels run on CPU tensors under the Triton interpreter. Triton decides at its import
whether to interpret, and torch imports triton early, so the interpreter tests run in-process
only when TRITON_INTERPRET=1 was set before Python started; otherwise
``test_interpreter_suite`` runs this file again in a subprocess with it set. The `gpu` tests
run the compiled kernels and PyTorch's 2:4 sparse products on CUDA (``pytest -m gpu``).
"""

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.sparse._semi_structured_conversions import _sparse_semi_structured_tile as torch_tile_py

from nmsparse.kernels import ops
from nmsparse.kernels import reference as ref
from nmsparse.kernels import semi_structured as ss
from nmsparse.kernels import triton_prune as tp
from nmsparse.kernels import unbiased
from nmsparse.nn.sdgp import prune_grad
from nmsparse.patterns.nm import is_nm, nm_mask
from nmsparse.patterns.transposable import transposable_mask

HAS_TRITON = tp.triton_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available()
SPARSE_CORES = ss.is_available()

interp_only = pytest.mark.skipif(
    not (HAS_TRITON and INTERPRET),
    reason="Triton interpreter tests: run by test_interpreter_suite (TRITON_INTERPRET=1 subprocess)"
    if HAS_TRITON else "triton is not installed")
gpu_kernels = [pytest.mark.gpu, pytest.mark.skipif(
    not (CUDA and HAS_TRITON and not INTERPRET), reason="needs CUDA and triton (compiled, not interpreted)")]
gpu_sparse = [pytest.mark.gpu, pytest.mark.skipif(
    not SPARSE_CORES, reason="needs an sm80+ NVIDIA GPU for 2:4 sparse tensor cores")]
# Where the kernels run: CPU tensors under the interpreter, CUDA tensors compiled.
TARGETS = [pytest.param("cpu", marks=interp_only, id="interp"),
           pytest.param("cuda", marks=gpu_kernels, id="cuda")]
HALF = [torch.float32, torch.float16, torch.bfloat16]
MS = [4, 8, 16, 32]
UNBIASED = {"mvue": unbiased.prune_mvue_reference, "random-unbiased": unbiased.prune_random_unbiased_reference}
INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype, NaN positions and bit pattern elsewhere (so -0.0 != 0.0). NaN payloads
    and signs are not compared: inf * 0 gives different NaNs on different hardware."""
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.isnan(), b.isnan()):
        return False
    a, b = a.masked_fill(a.isnan(), 0), b.masked_fill(b.isnan(), 0)
    return torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype]))


def sample(shape, dtype, seed=0, ties=True, special=True):
    """Random values; with ties: small integers (many equal magnitudes, signed zeros); with
    special: a few NaN / +-inf entries."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        x = torch.randint(-3, 4, shape, generator=g).to(torch.float32)
        x[torch.rand(shape, generator=g) < 0.1] = -0.0
    else:
        x = torch.randn(shape, generator=g)
    if special:
        flat = x.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[:3]
        flat[idx[0]] = math.nan
        flat[idx[1]] = math.inf
        if len(idx) > 2:
            flat[idx[2]] = -math.inf
    return x.to(dtype)


# ------------------------------------------------------------------------------------------------
# Interpreter in a subprocess

@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(INTERPRET, reason="already running under the Triton interpreter")
@pytest.mark.slow
def test_interpreter_suite():
    """This file again under TRITON_INTERPRET=1 (kernels on CPU tensors, against the references)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__).resolve()), "-q", "-rs", "-m", "not gpu",
           "-p", "no:cacheprovider", "-k", "not test_interpreter_suite"]
    res = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"interpreter run failed (rc={res.returncode}):\n{out[-6000:]}"
    assert " passed" in out and "test_interpreter_suite" not in out, out[-3000:]  # none skipped as "not interpreted"


# ------------------------------------------------------------------------------------------------
# References (plain torch: run everywhere)

@pytest.mark.parametrize("method", ref.PRUNE_METHODS)
@pytest.mark.parametrize("shape,dim", [((4, 8, 3, 5), 1), ((2, 6, 16), -1), ((6, 16), 1), ((16,), 0),
                                       ((8, 3, 4), 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_is_sdgp_prune_grad(method, shape, dim, dtype):
    g = sample(shape, dtype, seed=1)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    a = ref.prune_reference(g, 2, 4, method, dim, gen())
    b = prune_grad(g, 2, 4, method, dim, gen())
    assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    assert a.stride() == b.stride()


def test_reference_channels_last_layout():
    g = sample((2, 8, 3, 3), torch.float32, ties=False).to(memory_format=torch.channels_last)
    out = ref.prune_reference(g, 2, 4, "rescale", 1)
    assert out.stride() == g.stride()
    assert bits_equal(out, ref.prune_reference(g.contiguous(), 2, 4, "rescale", 1))


def test_triton_rand_reference_is_uniform_and_reproducible():
    u = ref.triton_rand(1234, torch.arange(200_000))
    assert u.dtype == torch.float32 and float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert float(((hist - 20_000) ** 2 / 20_000).sum()) < 40  # chi2, 9 dof
    assert torch.equal(u[:100], ref.triton_rand(1234, torch.arange(100)))
    assert not torch.equal(u[:100], ref.triton_rand(1235, torch.arange(100)))
    # 64-bit seeds and offsets use both Philox words
    big = ref.triton_rand((1 << 40) + 3, torch.arange(4) + (1 << 33))
    assert not torch.equal(big, ref.triton_rand(3, torch.arange(4) + (1 << 33)))
    with pytest.raises(ValueError):
        ref.triton_rand(-1, torch.arange(3))


@pytest.mark.parametrize("m", [4, 8])
def test_random_reference_picks_uniform_subsets(m):
    """Each n-subset of a group equally likely (chi-square over all C(m, n) subsets)."""
    n, groups = 2, 40_000 if m == 4 else 60_000
    g = torch.ones(groups, m)
    mask = ref.prune_random_reference(g, n, m, dim=1, seed=99) != 0
    assert bool((mask.sum(1) == n).all())
    codes = (mask.long() << torch.arange(m)).sum(1)
    counts = torch.bincount(codes, minlength=1 << m).float()
    subsets = [sum(1 << i for i in c) for c in itertools.combinations(range(m), n)]
    observed = counts[subsets]
    assert float(counts.sum()) == float(observed.sum())
    expected = groups / len(subsets)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    dof = len(subsets) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), chi2


def test_random_reference_keeps_non_finite_and_follows_logical_layout():
    g = sample((2, 8, 3, 3), torch.float32, ties=False, special=False)
    g[0, 1, 0, 0], g[1, 6, 2, 1] = math.nan, -math.inf
    a = ref.prune_random_reference(g, 1, 4, dim=1, seed=5)
    assert a[0, 1, 0, 0].isnan() and a[1, 6, 2, 1] == -math.inf
    b = ref.prune_random_reference(g.to(memory_format=torch.channels_last), 1, 4, dim=1, seed=5)
    assert torch.equal(a.nan_to_num(), b.nan_to_num())
    assert is_nm(a.nan_to_num(1.0), 1, 4, dim=1)


def test_srste_reference_semantics():
    w = torch.tensor([[-1.0, 3.0, -2.0, 0.5], [math.inf, math.inf, math.inf, 1.0]])
    out, mask = ref.srste_reference(w, 2, 4)
    assert torch.equal(mask, nm_mask(w, 2, 4, dim=1))
    assert str(out[0, 0].item()) == "-0.0" and out[1, 2].isnan()  # a product, not a select


def brute_greedy_tile(tile: list[float], absolute: bool) -> list[bool]:
    """Greedy over a 4x4 tile (row-major list) with a plain sort: distinct keys only."""
    keys = [abs(v) if absolute else v for v in tile]
    order = sorted(range(16), key=lambda i: -keys[i])
    rows, cols, keep = [0] * 4, [0] * 4, [False] * 16
    for i in order:
        r, c = divmod(i, 4)
        if rows[r] < 2 and cols[c] < 2:
            keep[i], rows[r], cols[c] = True, rows[r] + 1, cols[c] + 1
    return keep


def test_sorting_network_sorts():
    net = ref.sorting_network(16)
    assert len(net) == 65  # Bose-Nelson network for 16 inputs
    for bits in range(0, 1 << 16, 97):  # 0-1 principle, a sample of inputs
        a = [(bits >> i) & 1 for i in range(16)]
        for i, j in net:
            if not a[i] < a[j]:
                a[i], a[j] = a[j], a[i]
        assert a == sorted(a)


@pytest.mark.parametrize("algorithm", ["largest_abs_values_greedy", "largest_values_greedy", ""])
def test_tile24_matches_greedy_on_distinct_values(algorithm):
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(3))
    mask = ref.tile24_mask(x, algorithm)
    absolute = algorithm == "largest_abs_values_greedy"
    tiles = x.view(4, 4, 8, 4).permute(0, 2, 1, 3).reshape(-1, 16)
    mtiles = mask.view(4, 4, 8, 4).permute(0, 2, 1, 3).reshape(-1, 16)
    for t, mt in zip(tiles.tolist(), mtiles.tolist()):
        assert mt == brute_greedy_tile(t, absolute)
    if not absolute:  # PyTorch's own Python version (a stable sort) agrees where there are no ties
        assert torch.equal(torch_tile_py(x.clone()) != 0, mask)


def test_tile24_is_transposable_and_half_optimal():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(4))
    mask = ref.tile24_mask(x)
    t = mask.view(16, 4, 16, 4).permute(0, 2, 1, 3)  # (tile row, tile col, r, c)
    assert int(t.sum(-1).max()) <= 2 and int(t.sum(-2).max()) <= 2
    exact = transposable_mask(x, 2, 4, "exact")
    kept, best = float((x.abs() * mask).sum()), float((x.abs() * exact).sum())
    assert best / 2 <= kept <= best + 1e-4
    assert 0.4 < float(mask.float().mean()) <= 0.5


def test_tile24_ties_nan_and_padding():
    x = sample((6, 32), torch.float16, seed=5)  # ties, NaN and inf; 6 rows: the last tile is padded
    for algorithm in ref.TILE24_ALGORITHMS:
        mask = ref.tile24_mask(x, algorithm)
        assert mask.shape == x.shape and mask.dtype == torch.bool
        assert torch.equal(mask, ref.tile24_mask(x.clone(), algorithm))  # deterministic
        full = torch.cat([mask, torch.zeros(2, 32, dtype=torch.bool)]).view(2, 4, 8, 4).permute(0, 2, 1, 3)
        assert int(full.sum(-1).max()) <= 2 and int(full.sum(-2).max()) <= 2
    causal = ref.tile24_mask(x[:4], "causal1122").view(4, 8, 4)
    assert (causal.sum(-1).T <= torch.tensor([1, 1, 2, 2])).all()
    with pytest.raises(ValueError):
        ref.tile24_mask(torch.ones(4, 6))
    with pytest.raises(ValueError):
        ref.tile24_mask(torch.ones(4, 4), "bogus")


def test_tile24_prune_grad_layouts():
    g = sample((2, 8, 4, 4), torch.float32, ties=False, special=False)
    a = ref.tile24_prune_grad(g, 1)
    b = ref.tile24_prune_grad(g.to(memory_format=torch.channels_last), 1)
    assert torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)
    assert is_nm(a, 2, 4, dim=1, exact=False)
    two_d = ref.tile24_prune_grad(g.movedim(1, -1).reshape(-1, 8), -1)
    assert torch.equal(two_d, a.movedim(1, -1).reshape(-1, 8))
    lin = torch.randn(3, 8, 16)
    assert torch.equal(ref.tile24_prune_grad(lin, -1), ref.tile24_reference(lin.reshape(24, 16)).view(3, 8, 16))


def test_tile_masks_encode_decode_round_trip():
    mask = torch.rand(40, 96, generator=torch.Generator().manual_seed(6)) < 0.5
    enc = ss.encode_tile_masks(mask)
    assert enc.dtype == torch.uint8 and tuple(enc.shape) == ss.tile_masks_shape(40, 96)
    assert torch.equal(ss.decode_tile_masks(enc, (40, 96)), mask)
    # word 0 of entry (0, 0) is the top-left 4x4 tile, bit col + 4 * row
    one = torch.zeros(32, 64, dtype=torch.bool)
    one[1, 2] = True
    enc = ss.encode_tile_masks(one)
    assert int(enc[0, 0, 0]) == 1 << 6 and int(enc.sum()) == 64
    one[1, 2], one[5, 6] = False, True  # bottom-right tile of the first 8x8 block: word 3
    enc = ss.encode_tile_masks(one)
    assert int(enc[0, 0, 7]) == (1 << (2 + 4 * 1)) >> 8 and int(enc[0, 0, 6]) == (1 << 6) & 0xFF


# ------------------------------------------------------------------------------------------------
# Kernels vs references (interpreter on CPU tensors, compiled on CUDA)

def _check_against_reference(x, n, m, method, dim, exact=True):
    out, mask = tp.prune(x, n, m, method, dim, return_mask=True, seed=11)
    if method == "random":
        expect = ref.prune_random_reference(x.cpu(), n, m, dim, seed=11)
    elif method in UNBIASED:
        expect = UNBIASED[method](x.cpu(), n, m, dim, seed=11)
        exact = exact and method != "mvue"  # group sums in another order: equal up to rounding
    else:
        expect = ref.prune_reference(x.cpu(), n, m, method, dim)
    assert out.stride() == expect.stride() and out.dtype == x.dtype and out.device == x.device
    if exact:
        assert bits_equal(out, expect)
    else:
        torch.testing.assert_close(out.cpu(), expect, rtol=2e-6 if x.dtype == torch.float32 else 8e-3,
                                   atol=0, equal_nan=True)
    if method != "mvue":  # (mvue keeps every nonzero of a group with fewer than n: counted by its test)
        assert is_nm(mask.cpu(), n, m, dim=dim)
    if method != "rescale":  # (rescale turns a plane holding inf or NaN into NaN throughout)
        assert torch.equal(torch.where(mask.cpu(), x.cpu(), 0).isnan(), out.cpu().isnan())
    return out, mask


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m", MS)
def test_magnitude_bit_exact(target, dtype, m):
    for i, n in enumerate(sorted({1, m // 2, m - 1})):
        x = sample((2, 2 * m, 3), dtype, seed=10 * m + i).to(target)
        out, mask = _check_against_reference(x, n, m, "magnitude", 1)
        assert torch.equal(mask.cpu(), nm_mask(x.cpu(), n, m, dim=1))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m", MS)
def test_rescale_matches(target, dtype, m):
    x = sample((2, 2 * m, 5), dtype, seed=m, ties=False, special=False).to(target)
    _check_against_reference(x, m // 2, m, "rescale", 1, exact=False)
    _check_against_reference(x.reshape(-1, 2 * m)[:4], m // 4 or 1, m, "rescale", -1, exact=False)  # rows


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("m", MS)
def test_random_matches_philox_reference(target, m):
    x = sample((3, m, 4), torch.float16, seed=m, ties=False).to(target)
    out, mask = _check_against_reference(x, m // 2, m, "random", 1)
    assert bool(mask.cpu()[~torch.isfinite(x.cpu())].all())  # non-finite always kept


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("m", MS)
def test_unbiased_match_their_references(target, dtype, m):
    """The Triton "mvue" and "random-unbiased" equal the reference stream (the kernel's own uniforms),
    with ties, zeros, NaN and inf; mvue keeps exactly n where a group has n nonzeros or more."""
    for i, n in enumerate(sorted({1, m // 2, m - 1, m})):
        for ties in (False, True):
            x = sample((2, 2 * m, 5), dtype, seed=100 * m + 10 * i + ties, ties=ties).to(target)
            for method in UNBIASED:
                _check_against_reference(x, n, m, method, 1, exact=method != "mvue")
            out = tp.prune(x, n, m, "mvue", 1, seed=11).cpu()
            fin = torch.isfinite(x.cpu()).movedim(1, -1).reshape(-1, m).all(1)
            kept = (out != 0).movedim(1, -1).reshape(-1, m).sum(1)
            nonzero = (x.cpu() != 0).movedim(1, -1).reshape(-1, m).sum(1)
            assert torch.equal(kept[fin], nonzero[fin].clamp(max=n))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", ["nchw", "channels_last", "lastdim3d", "rows2d", "dim0", "vector",
                                  "strided", "permuted"])
def test_layouts(target, case):
    g = sample((2, 8, 3, 5), torch.float32, seed=3, ties=False)
    dim = 1
    if case == "channels_last":
        g = g.to(memory_format=torch.channels_last)
    elif case == "lastdim3d":
        g, dim = g.reshape(2, 15, 8), -1
    elif case == "rows2d":
        g, dim = g.reshape(30, 8), 1
    elif case == "dim0":
        g, dim = g.reshape(8, 30), 0
    elif case == "vector":
        g, dim = g.reshape(-1)[:16].clone(), 0
    elif case == "strided":
        g = g[:, :, ::2]  # not dense: computed on a channels-last copy, returned contiguous-like
    elif case == "permuted":
        g = g.permute(0, 1, 3, 2)  # dense, strides that do not merge
    g = g.to(target)
    for method in ref.PRUNE_METHODS:
        _check_against_reference(g, 2, 4, method, dim, exact=method != "rescale")
    if case in ("nchw", "channels_last"):  # the same values whatever the memory format
        a = tp.prune(g, 2, 4, "random", 1, seed=3)
        b = tp.prune(g.contiguous(), 2, 4, "random", 1, seed=3)
        assert torch.equal(a.cpu().nan_to_num(), b.cpu().nan_to_num())


@pytest.mark.parametrize("target", TARGETS)
def test_rescale_planes_with_overflow(target):
    """A plane holding inf or NaN becomes NaN throughout (sum|g| / sum|kept| = inf / inf), as in torch."""
    g = sample((2, 4, 3, 3), torch.float16, seed=8, ties=False, special=False)
    g[0, 1, 1, 1] = math.inf
    g[1, 2, 0, 0] = math.nan
    out = tp.prune(g.to(target), 2, 4, "rescale", 1).cpu()
    expect = ref.prune_reference(g, 2, 4, "rescale", 1)
    assert torch.equal(out.isnan(), expect.isnan()) and bool(out[0, 1].isnan().all())
    torch.testing.assert_close(out, expect, rtol=2e-3, atol=0, equal_nan=True)  # float sums: 1 ulp


@pytest.mark.parametrize("target", TARGETS)
def test_random_reproducible_uniform_and_seeded(target):
    m, n = 4, 2
    g = torch.ones(512, m, device=target, dtype=torch.float16)
    a = tp.prune(g, n, m, "random", -1, seed=21) != 0
    assert torch.equal(a, tp.prune(g, n, m, "random", -1, seed=21) != 0)
    assert not torch.equal(a, tp.prune(g, n, m, "random", -1, seed=22) != 0)
    assert not torch.equal(a, tp.prune(g, n, m, "random", -1, seed=21, offset=4) != 0)
    shifted = tp.prune(g[1:].contiguous(), n, m, "random", -1, seed=21, offset=m)  # offset = index shift
    assert torch.equal(shifted != 0, a[1:])
    a = a.cpu()
    assert bool((a.sum(1) == n).all())
    freq = a.float().mean(0)  # each position kept with probability n / m
    assert float((freq - n / m).abs().max()) < 5 * math.sqrt(0.25 / 512)
    assert tp.step_seed(3, 5) == 3 * 1_000_003 + 5
    gen = torch.Generator().manual_seed(tp.step_seed(3, 5))
    assert tp.seed_from_generator(gen) == 3 * 1_000_003 + 5


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(8, 16), (4, 8, 3, 3)])
def test_srste_mask_apply_bit_exact(target, dtype, shape):
    w = sample(shape, dtype, seed=len(shape))
    if len(shape) == 2:
        w[0, :4] = torch.tensor([math.inf, math.inf, math.inf, 1.0])  # pruned inf: inf * 0 = NaN
    for layout in ([torch.contiguous_format, torch.channels_last] if len(shape) == 4 else [None]):
        wl = w.to(memory_format=layout) if layout is not None else w
        out, mask = tp.srste_mask_apply(wl.to(target), 2, 4)
        eo, em = ref.srste_reference(wl, 2, 4)
        assert torch.equal(mask.cpu(), em) and bits_equal(out, eo)


@pytest.mark.parametrize("target", TARGETS)
def test_argument_errors(target):
    x = torch.randn(4, 8, device=target)
    with pytest.raises(ValueError, match="m in"):
        tp.prune(torch.randn(4, 12, device=target), 2, 3)
    with pytest.raises(ValueError, match="m in"):
        tp.prune(torch.randn(2, 64, device=target), 2, 64)
    with pytest.raises(TypeError):
        tp.prune(x.double(), 2, 4)
    with pytest.raises(ValueError):
        tp.prune(x, 0, 4)
    with pytest.raises(ValueError, match="divisible"):
        tp.prune(torch.randn(4, 6, device=target), 2, 4, dim=1)
    with pytest.raises(ValueError, match="method"):
        tp.prune(x, 2, 4, "tile24")
    with pytest.raises(ValueError, match="seed"):
        tp.prune(x, 2, 4, "random", seed=-1)
    assert tp.prune(torch.empty(0, 8, device=target), 2, 4).shape == (0, 8)


@pytest.mark.skipif(not HAS_TRITON or INTERPRET, reason="needs triton imported without the interpreter")
def test_cpu_tensors_without_interpreter_raise_clearly():
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tp.prune(torch.randn(4, 8), 2, 4)


# ------------------------------------------------------------------------------------------------
# 2:4 sparse tensor cores (GPU only)

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algorithm", ["largest_abs_values_greedy", ""])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.gpu
@pytest.mark.skipif(not SPARSE_CORES, reason="needs an sm80+ NVIDIA GPU")
def test_tile24_reference_matches_cuda_tile_op(dtype, algorithm, ties):
    """The CPU emulation of the tile op keeps exactly the entries the GPU keeps (ties included)."""
    x = sample((128, 256), dtype, seed=12, ties=ties, special=False).cuda()
    masks = torch._sparse_semi_structured_tile(x, algorithm=algorithm, use_cutlass=True)[4]
    got = ss.decode_tile_masks(masks, x.shape)
    assert torch.equal(got, ref.tile24_mask(x.cpu(), algorithm))
    assert torch.equal(ss.encode_tile_masks(got), masks.cpu())


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.gpu
@pytest.mark.skipif(not SPARSE_CORES, reason="needs an sm80+ NVIDIA GPU")
def test_sparse_products_match_dense(dtype):
    torch.manual_seed(0)
    T, O, I = 256, 512, 256
    gy = torch.randn(T, O, device="cuda", dtype=dtype)
    w = torch.randn(O, I, device="cuda", dtype=dtype)
    if torch.cuda.get_device_capability()[0] == 8:
        tile = ss.prune_tile24(gy)
        assert torch.equal(tile.to_dense().cpu() != 0, ref.tile24_mask(gy.cpu()) & (gy.cpu() != 0))
        assert _rel(ss.sdgp_dx_tile24(gy, w), ref.tile24_reference(gy) @ w) < 1e-2
    else:  # the fused route's compressed form is sm8x-only; its masks still agree, and to_sparse_24 compresses
        with pytest.raises(ss.SemiStructuredUnavailable, match="sm8x GPUs only"):
            ss.prune_tile24(gy)
        assert _rel(ss.to_sparse_24(ops.tile24_prune_grad(gy)) @ w, ref.tile24_reference(gy) @ w) < 1e-2
    if HAS_TRITON:
        for method in ("magnitude", "rescale"):
            assert _rel(ss.sdgp_dx_separate(gy, w, method), ref.prune_reference(gy, 2, 4, method, -1) @ w) < 1e-2
    # Linear24: forward and backward vs dense with the same masked weight
    wt = torch.randn(I, O, device="cuda", dtype=torch.float32)
    mask = transposable_mask(wt, 2, 4, "exact")
    wm = (wt * mask).to(dtype).requires_grad_()
    x = torch.randn(T, O, device="cuda", dtype=dtype, requires_grad=True)
    for transposable in (False, True):
        y = ss.linear24(x, wm, None, transposable)
        y_ref = torch.nn.functional.linear(x, wm)
        assert _rel(y, y_ref) < 1e-2
        dy = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, wm), dy)
        rx, rw = torch.autograd.grad(y_ref, (x, wm), dy)
        assert _rel(gx, rx) < 1e-2 and _rel(gw, rw) < 1e-2


# ------------------------------------------------------------------------------------------------
# The GPU benchmark's harness, dry-run on the CPU (2:4 products replaced by their dense equivalent)

@interp_only
def test_bench_gpu_dry_run(monkeypatch, tmp_path):
    import json

    from nmsparse.bench import gpu

    from nmsparse.kernels import dispatch, ops
    from nmsparse.kernels.dispatch import Dispatcher

    monkeypatch.setattr(ss, "require", lambda *a, **k: None)
    monkeypatch.setattr(ss, "to_sparse_24", lambda t, backend="auto": t.detach().clone())
    monkeypatch.setattr(ss, "prune_tile24", lambda x, algorithm="largest_abs_values_greedy", backend="cutlass":
                        ref.tile24_reference(x))
    # the sparse-core Linears of the block and training steps: decisions forced to sparse
    monkeypatch.setattr(ops, "weight24_applies", lambda a, w: True)
    monkeypatch.setattr(dispatch, "_default", Dispatcher(timer=lambda dense_fn, sparse_fn: (2.0, 1.0)))
    res = gpu.run(out=tmp_path / "bench.json", quick=True, log=lambda *a: None, _allow_cpu=True)
    assert res["errors"] == []
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved["tables"]) == {"roofs", "prune", "gemm", "block", "train", "dispatch"}
    assert "## dispatch" in (tmp_path / "bench.md").read_text()
    for section in ("prune", "gemm", "block", "train"):
        bad = [r for r in res[section] if r.get("check") != "ok"]
        assert not bad, (section, bad)
    assert {r["route"] for r in res["gemm"]} >= {"dense", "2:4 W (compressed)", "2:4-T W + compress",
                                                  "separate: prune + compress + 2:4 GEMM",
                                                  "fused tile24: tile prune+compress + 2:4 GEMM"}
    for section in ("block", "train"):  # built by sparsify: SDGP layers, and 2:4-T weights on sparse-core Linears
        assert all(r["sparse_layers"] > 0 for r in res[section] if r["variant"] != "dense")
        assert all((r["core_layers"] > 0) == ("2:4-T" in r["variant"]) for r in res[section])
    assert {r["op"] for r in res["dispatch"] if r["choice"] == "sparse"} == {"w24_linear", "w24t_linear_dx"}
    assert "## dispatch" in (tmp_path / "bench.md").read_text()
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["environment"]["torch"] == torch.__version__ and "prune" in saved["tables"]
    assert "## gemm" in (tmp_path / "bench.md").read_text()


@pytest.mark.parametrize("method", ref.PRUNE_METHODS)
@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAS_TRITON and not INTERPRET), reason="needs CUDA and triton")
def test_sdgp_prune_grad_uses_the_kernel_on_cuda(method):
    from nmsparse.kernels import ops

    g = sample((4, 16, 6, 6), torch.bfloat16, seed=2, ties=False).cuda().to(memory_format=torch.channels_last)
    gen = torch.Generator(device="cuda").manual_seed(tp.step_seed(1, 3))
    out = prune_grad(g, 2, 4, method, 1, gen)
    assert ops.triton_failure() is None
    assert out.stride() == g.stride()
    if method == "random":  # the kernel's Philox stream, seeded by the generator's seed
        assert bits_equal(out, ref.prune_random_reference(g.cpu(), 2, 4, 1, seed=tp.step_seed(1, 3)))
    elif method in UNBIASED:  # their uniforms come from the same stream
        torch.testing.assert_close(out.cpu(), UNBIASED[method](g.cpu(), 2, 4, 1, seed=tp.step_seed(1, 3)),
                                   rtol=8e-3, atol=0, equal_nan=True)
    elif method == "magnitude":
        assert bits_equal(out, ref.prune_reference(g.cpu(), 2, 4, method, 1))
    else:
        torch.testing.assert_close(out.cpu(), ref.prune_reference(g.cpu(), 2, 4, method, 1), rtol=8e-3,
                                   atol=0, equal_nan=True)


@pytest.mark.parametrize("method", ["tile24", "magnitude"])
@pytest.mark.gpu
@pytest.mark.skipif(not SPARSE_CORES, reason="needs an sm80+ NVIDIA GPU for 2:4 sparse tensor cores")
def test_sdgp_linear_layer_on_sparse_cores(method):
    """An SDGPLinear's input gradient on the GPU (sparse cores where the dispatcher picks them)
    equals its pruning rule applied to dY, times W, within bf16 rounding."""
    from nmsparse.nn.sdgp import SDGPLinear, prune_grad

    torch.manual_seed(0)
    lin = SDGPLinear(512, 1024, method=method).cuda().to(torch.bfloat16)
    x = torch.randn(1024, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gy = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
    lin(x).backward(gy)
    want = prune_grad(gy.float().cpu(), 2, 4, method, dim=-1) @ lin.weight.detach().float().cpu()
    assert _rel(x.grad.float().cpu(), want) < 2e-2


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    """A build killed mid-way leaves torch's lock file, on which the next build would wait forever."""
    import os
    import time

    from nmsparse.kernels._extensions import clear_stale_lock

    lock = tmp_path / "lock"
    lock.touch()
    assert not clear_stale_lock(lock) and lock.exists()  # a build may be running
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        assert clear_stale_lock(lock)
    assert not lock.exists() and not clear_stale_lock(lock)


def test_a_failed_build_reports_the_compilers_error(monkeypatch):
    """torch's build error ends in "ninja: build stopped: subcommand failed"; the reason kept names the error."""
    from nmsparse.kernels import _extensions

    log = ("Error building extension 'nmsparse_x': [1/2] c++ -MMD -DTORCH_EXTENSION_NAME=x -O3 -c x.cpp -o x.o\n"
           "FAILED: x.o\nx.cpp:147:23: error: invalid 'static_cast' from type 'int'\n"
           "x.cpp:150:1: error: expected ';'\nninja: build stopped: subcommand failed.")

    def fail(*args, **kwargs):
        raise RuntimeError(log)

    monkeypatch.setattr(_extensions, "build_extension", fail)
    monkeypatch.delenv("NMSPARSE_NO_NATIVE", raising=False)
    ext = _extensions.NativeExtension("nmsparse_test", ["x.cpp"])
    assert ext.load() is None and ext.load() is None
    assert ext.error.startswith("RuntimeError: x.cpp:147:23: error: invalid 'static_cast'")
    assert "x.cpp:150:1: error" in ext.error and ext.error.endswith("subcommand failed.")


def test_an_edited_header_or_source_builds_afresh(tmp_path, monkeypatch):
    """The extension's name hashes its sources and every header in csrc/: an edit to either is a new build, not a stale
    load of the old one (nm_prune.cpp includes nm_prune_rows.h)."""
    from nmsparse.kernels import _extensions

    monkeypatch.setattr(_extensions, "CSRC", tmp_path)
    (tmp_path / "x.cpp").write_text('#include "x.h"\n')
    (tmp_path / "x.h").write_text("int f();\n")
    first = _extensions.build_name("nmsparse_x", ["x.cpp"])
    assert first.startswith("nmsparse_x_") and first == _extensions.build_name("nmsparse_x", "x.cpp")
    (tmp_path / "x.h").write_text("int f(int);\n")
    second = _extensions.build_name("nmsparse_x", ["x.cpp"])
    (tmp_path / "x.cpp").write_text('#include "x.h"\n// edited\n')
    third = _extensions.build_name("nmsparse_x", ["x.cpp"])
    assert len({first, second, third}) == 3
    assert _extensions.build_name("nmsparse_x", ["x.cpp"], ["-O2"]) != third
