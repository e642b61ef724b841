"""Tests for nmsparse.formats: N:M and block compression, bit packing, save/load, size accounting."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nmsparse
from nmsparse import nm_mask
from nmsparse.formats import (BlockCompressed, NMCompressed, compress_block, compress_nm, load,
                              save, size_report)
from nmsparse.formats import io as fio
from nmsparse.formats.nm import index_bits, pack_bits, unpack_bits

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
MS = [1, 2, 4, 8, 16, 32]
FAST = settings(deadline=None)  # example count from the profile in conftest.py (40 by default)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


# ---- independent references (plain Python) -------------------------------------------------

def ref_pack(values, bits):
    stream = sum(int(v) << (k * bits) for k, v in enumerate(values))
    return list(stream.to_bytes((len(values) * bits + 7) // 8, "little"))


def ref_unpack(packed, bits, count):
    stream = int.from_bytes(bytes(packed), "little")
    return [(stream >> (k * bits)) & ((1 << bits) - 1) for k in range(count)]


def ref_nm_dense(c: NMCompressed):
    """Rebuild the dense tensor from values + packed indices with loops over groups."""
    pos = ref_unpack(c.indices.tolist(), c.bits, c.values.numel())
    vals = c.values.reshape(-1, c.n).tolist() if c.n else []
    moved_shape = list(c.values.shape[:-2]) + [c.shape[c.dim]]
    out = torch.zeros(moved_shape, dtype=torch.float64).reshape(-1, c.m)
    for g, row in enumerate(vals):
        for j, v in enumerate(row):
            out[g, pos[g * c.n + j]] = v
    return out.reshape(moved_shape).movedim(-1, c.dim)


def ref_block_dense(b: BlockCompressed):
    out = torch.zeros(b.shape, dtype=torch.float64)
    bo, bi = b.block
    crow, col = b.crow_indices.tolist(), b.col_indices.tolist()
    for r in range(len(crow) - 1):
        for k in range(crow[r], crow[r + 1]):
            c = col[k]
            out[r * bo:(r + 1) * bo, c * bi:(c + 1) * bi] = b.values[k].double()
    return out


# ---- bit packing ---------------------------------------------------------------------------

@FAST
@given(bits=st.integers(0, 8), count=st.integers(0, 70), seed=st.integers(0, 2**31))
def test_pack_bits_matches_reference_layout(bits, count, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 1 << bits, (count,), generator=g).to(torch.uint8)
    packed = pack_bits(idx, bits)
    assert packed.dtype == torch.uint8 and packed.shape == ((count * bits + 7) // 8,)
    assert packed.tolist() == ref_pack(idx.tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, count), idx)


@pytest.mark.parametrize("m,bits", [(1, 0), (2, 1), (3, 2), (4, 2), (5, 3), (8, 3), (9, 4),
                                    (16, 4), (32, 5), (64, 6), (256, 8)])
def test_index_bits(m, bits):
    assert index_bits(m) == bits


def test_pack_bits_errors():
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([4], dtype=torch.uint8), 2)
    with pytest.raises(TypeError, match="idx"):
        pack_bits(torch.tensor([1]), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_bits(torch.tensor([1], dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="packed"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 3, 3)
    with pytest.raises(TypeError, match="packed"):
        unpack_bits(torch.zeros(1, dtype=torch.int8), 3, 1)


# ---- N:M compression -----------------------------------------------------------------------

@st.composite
def nm_cases(draw):
    m = draw(st.sampled_from(MS))
    n = draw(st.integers(0, m))
    ndim = draw(st.integers(1, 3))
    dim = draw(st.integers(-ndim, ndim - 1))
    shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
    shape[dim] = m * draw(st.integers(1, 3))
    dtype = draw(st.sampled_from(FLOATS))
    return n, m, dim, tuple(shape), dtype, draw(st.integers(0, 2**31))


@FAST
@given(nm_cases())
def test_nm_round_trip_with_mask(case):
    n, m, dim, shape, dtype, seed = case
    x = randn(shape, dtype, seed)
    mask = nm_mask(x, n, m, dim)
    pruned = x * mask
    c = compress_nm(pruned, n, m, dim, mask=mask)
    d = dim % len(shape)
    lead = shape[:d] + shape[d + 1:]
    assert c.values.shape == lead + (shape[d] // m, n)
    assert c.values.dtype == dtype and c.dtype == dtype and c.dim == d and c.shape == shape
    dense = c.to_dense()
    assert dense.dtype == dtype and dense.shape == shape
    assert torch.equal(dense, pruned)
    assert torch.equal(ref_nm_dense(c), pruned.double())
    # positions strictly ascending within each group
    pos = torch.tensor(ref_unpack(c.indices.tolist(), c.bits, c.values.numel())).view(c.values.shape)
    assert bool((pos[..., 1:] > pos[..., :-1]).all()) and bool((pos < m).all())
    # sizes: values plus ceil(log2 m) bits per kept value, rounded up to a byte
    kept = x.numel() * n // m
    assert c.indices.numel() == math.ceil(kept * index_bits(m) / 8)
    assert c.nbytes == kept * x.element_size() + c.indices.numel()
    assert c.dense_nbytes == x.numel() * x.element_size()


@FAST
@given(nm_cases(), st.floats(0.0, 1.0))
def test_nm_round_trip_without_mask(case, drop):
    n, m, dim, shape, dtype, seed = case
    x = randn(shape, dtype, seed)
    # at most n nonzeros per group: an n:m pruning with some further entries zeroed
    g = torch.Generator().manual_seed(seed + 1)
    y = x * nm_mask(x, n, m, dim) * (torch.rand(shape, generator=g) >= drop)
    c = compress_nm(y, n, m, dim)
    assert torch.equal(c.to_dense(), y)
    assert torch.equal(ref_nm_dense(c), y.double())


@pytest.mark.parametrize("n,m,dtype,ratio", [
    (2, 4, torch.float16, 0.5625),             # (2*2 B + 2*2 bit) / (4*2 B)
    (2, 4, torch.bfloat16, 0.5625),
    (1, 4, torch.float32, (4 + 2 / 8) / 16),
    (4, 8, torch.float16, (8 + 12 / 8) / 16),
    (16, 32, torch.float16, (32 + 80 / 8) / 64),
    (1, 1, torch.float32, 1.0),
])
def test_nm_compressed_size_ratio(n, m, dtype, ratio):
    x = randn((64, 256), dtype, 0)
    c = compress_nm(x, n, m, mask=nm_mask(x, n, m))
    assert c.nbytes / c.dense_nbytes == pytest.approx(ratio, abs=1e-12)
    assert size_report(c)["ratio"] == pytest.approx(ratio, abs=1e-12)


def test_nm_keeps_special_values_bit_exactly():
    x = torch.tensor([[-0.0, 0.0, 0.0, 0.0, float("nan"), 0.0, float("-inf"), 0.0]])
    mask = torch.tensor([[True, True, False, False, True, False, True, False]])
    c = compress_nm(x, 2, 4, mask=mask)
    dense = c.to_dense()
    assert torch.signbit(dense[0, 0]) and torch.isnan(dense[0, 4]) and dense[0, 6] == -math.inf
    assert torch.equal(dense.view(torch.int32), (x * 1).masked_fill(~mask, 0).view(torch.int32))


def test_nm_device_and_to():
    x = randn((4, 8), torch.float32, 1)
    c = compress_nm(x, 2, 4, mask=nm_mask(x, 2, 4))
    assert c.device == torch.device("cpu")
    c2 = c.to("cpu")
    assert torch.equal(c2.to_dense(), c.to_dense())
    assert "n=2" in repr(c) and "m=4" in repr(c)


def test_nm_violation_without_mask_names_count_and_fix():
    x = torch.zeros(4, 8)
    x[0, :3] = 1.0   # group (0, 0..3): 3 nonzeros
    x[2, 4:] = 1.0   # group (2, 4..7): 4 nonzeros
    x[3, :2] = 1.0   # fine
    with pytest.raises(ValueError, match=r"2 of 8 groups") as e:
        compress_nm(x, 2, 4)
    assert "mask=" in str(e.value) and "nm_mask" in str(e.value)


def test_nm_bad_inputs():
    x = randn((4, 8), torch.float32, 2)
    good = nm_mask(x, 2, 4)
    with pytest.raises(TypeError, match="x"):
        compress_nm(torch.ones(4, 8, dtype=torch.int32), 2, 4)
    with pytest.raises(TypeError, match="x"):
        compress_nm(torch.ones(4, 8, dtype=torch.bool), 2, 4)
    with pytest.raises(TypeError, match="x"):
        compress_nm([1.0, 2.0], 1, 2)
    with pytest.raises(ValueError, match=r"dim.*\(4, 8\)"):
        compress_nm(x, 1, 3)
    with pytest.raises(ValueError, match="dim=2"):
        compress_nm(x, 2, 4, dim=2)
    with pytest.raises(ValueError, match="n="):
        compress_nm(x, 5, 4)
    with pytest.raises(ValueError, match="m="):
        compress_nm(torch.zeros(2, 512), 1, 512)
    with pytest.raises(TypeError, match="mask"):
        compress_nm(x, 2, 4, mask=good.float())
    with pytest.raises(ValueError, match=r"mask.*\(4, 4\)"):
        compress_nm(x, 2, 4, mask=good[:, :4])
    wrong = good.clone()
    wrong[0, 0] = ~wrong[0, 0]
    with pytest.raises(ValueError, match=r"mask has 1 groups.*n=2"):
        compress_nm(x, 2, 4, mask=wrong)


def test_nm_constructor_validates():
    x = randn((4, 8), torch.float32, 3)
    c = compress_nm(x, 2, 4, mask=nm_mask(x, 2, 4))
    with pytest.raises(ValueError, match="values"):
        NMCompressed(c.values[:2], c.indices, 2, 4, 1, (4, 8))
    with pytest.raises(ValueError, match="indices"):
        NMCompressed(c.values, c.indices[:-1], 2, 4, 1, (4, 8))
    with pytest.raises(TypeError, match="indices"):
        NMCompressed(c.values, c.indices.to(torch.int8), 2, 4, 1, (4, 8))


@CUDA
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("n,m,dim", [(2, 4, -1), (4, 8, 0), (5, 32, 1), (1, 1, 0)])
def test_nm_cuda_matches_cpu(dtype, n, m, dim):
    x = randn((64, 96), dtype, 4)
    mask = nm_mask(x, n, m, dim)
    cpu = compress_nm(x * mask, n, m, dim)
    gpu = compress_nm((x * mask).cuda(), n, m, dim, mask=mask.cuda())
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.values.cpu(), cpu.values) and torch.equal(gpu.indices.cpu(), cpu.indices)
    assert torch.equal(gpu.to_dense().cpu(), x * mask)
    assert torch.equal(cpu.to("cuda").to_dense().cpu(), x * mask)


# ---- block compression ---------------------------------------------------------------------

@st.composite
def block_cases(draw):
    block = draw(st.sampled_from([(8, 8), (1, 1), (2, 4), (4, 2), (3, 1)]))
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    kernel = draw(st.sampled_from([(), (1, 1), (3, 3), (1, 2)]))
    shape = (rows * block[0], cols * block[1]) + kernel
    dtype = draw(st.sampled_from(FLOATS))
    return shape, block, dtype, draw(st.integers(0, 2**31))


def expand(grid, block, shape):
    full = grid.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return full.view(full.shape + (1,) * (len(shape) - 2)).expand(shape)


@FAST
@given(block_cases(), st.floats(0.0, 1.0))
def test_block_round_trip(case, density):
    shape, block, dtype, seed = case
    g = torch.Generator().manual_seed(seed)
    grid = torch.rand(shape[0] // block[0], shape[1] // block[1], generator=g) < density
    full = expand(grid, block, shape)
    w = randn(shape, dtype, seed) * full
    ref_keep = (w != 0).reshape(grid.shape[0], block[0], grid.shape[1], block[1], -1) \
        .transpose(1, 2).flatten(2).any(-1)
    for mask in (None, grid, full):
        b = compress_block(w, block, mask=mask)
        keep = ref_keep if mask is None else grid
        assert b.nnzb == int(keep.sum())
        assert b.values.shape == (b.nnzb,) + block + shape[2:]
        assert b.crow_indices.dtype == torch.int32 and b.col_indices.dtype == torch.int16
        assert torch.equal(b.block_mask(), keep)
        assert torch.equal(b.to_dense(), w)
        assert torch.equal(ref_block_dense(b) if len(shape) == 2 else b.to_dense().double(),
                           w.double())
        assert b.density == pytest.approx(int(keep.sum()) / keep.numel())
        assert b.nbytes == (b.values.numel() * w.element_size() + 4 * (grid.shape[0] + 1)
                            + 2 * b.nnzb)
        assert b.dense_nbytes == w.numel() * w.element_size()
        if len(shape) == 2:
            bsr = b.to_bsr()
            assert bsr.layout == torch.sparse_bsr
            assert torch.equal(bsr.to_dense(), w)


def test_block_4d_reference_loops():
    w = randn((16, 24, 3, 3), torch.float32, 5)
    grid = torch.tensor([[True, False, True], [False, False, True]])
    b = compress_block(w, mask=grid)
    ref = torch.zeros_like(w)
    for r in range(2):
        for k in range(int(b.crow_indices[r]), int(b.crow_indices[r + 1])):
            c = int(b.col_indices[k])
            ref[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = b.values[k]
    assert torch.equal(b.to_dense(), ref)
    assert torch.equal(ref, w * expand(grid, (8, 8), w.shape))
    assert b.crow_indices.tolist() == [0, 2, 3] and b.col_indices.tolist() == [0, 2, 2]


def test_block_bsr_matmul_matches_dense():
    w = randn((32, 48), torch.float64, 6)
    grid = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    b = compress_block(w, mask=grid)
    x = randn((48, 5), torch.float64, 7)
    assert torch.allclose(b.to_bsr() @ x, b.to_dense() @ x)


@pytest.mark.parametrize("cols,dtype", [(1 << 15, torch.int16), ((1 << 15) + 1, torch.int32)])
def test_block_col_index_dtype(cols, dtype):
    w = torch.zeros(1, cols)
    w[0, -1] = 1.0
    b = compress_block(w, (1, 1))
    assert b.col_indices.dtype == dtype and b.col_indices.tolist() == [cols - 1]
    assert torch.equal(b.to_dense(), w)


def test_block_all_zero_and_all_kept():
    z = torch.zeros(16, 16)
    b = compress_block(z)
    assert b.nnzb == 0 and b.density == 0.0 and torch.equal(b.to_dense(), z)
    assert b.nbytes == 4 * 3
    w = randn((16, 16), torch.float32, 8)
    assert compress_block(w).density == 1.0


def test_block_bad_inputs():
    w = randn((16, 24), torch.float32, 9)
    with pytest.raises(ValueError, match=r"w must be 2-D.*\(16, 24, 3\)"):
        compress_block(randn((16, 24, 3), torch.float32, 0))
    with pytest.raises(ValueError, match=r"w must be 2-D"):
        compress_block(randn((16,), torch.float32, 0))
    with pytest.raises(ValueError, match=r"dim 1.*\(16, 20\).*block"):
        compress_block(randn((16, 20), torch.float32, 0))
    with pytest.raises(ValueError, match=r"dim 0.*\(12, 24, 3, 3\).*block"):
        compress_block(randn((12, 24, 3, 3), torch.float32, 0))
    with pytest.raises(TypeError, match="w"):
        compress_block(torch.ones(16, 16, dtype=torch.int64))
    with pytest.raises(TypeError, match="w"):
        compress_block(torch.ones(16, 16, dtype=torch.bool))
    with pytest.raises(TypeError, match="block"):
        compress_block(w, block=(8, 8, 1))
    with pytest.raises(ValueError, match="block"):
        compress_block(w, block=(0, 8))
    with pytest.raises(TypeError, match="mask"):
        compress_block(w, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask.*\(2, 2\)"):
        compress_block(w, mask=torch.ones(2, 2, dtype=torch.bool))
    partial = torch.ones(16, 24, dtype=torch.bool)
    partial[0, 0] = False
    with pytest.raises(ValueError, match=r"mask.*not constant within 1 of the 6 blocks"):
        compress_block(w, mask=partial)
    b4 = compress_block(randn((8, 8, 3, 3), torch.float32, 0))
    with pytest.raises(ValueError, match="2-D"):
        b4.to_bsr()


def test_block_constructor_validates():
    b = compress_block(randn((16, 16), torch.float32, 10))
    with pytest.raises(ValueError, match="values"):
        BlockCompressed(b.values[:, :4], b.crow_indices, b.col_indices, b.shape, b.block)
    with pytest.raises(ValueError, match="crow_indices"):
        BlockCompressed(b.values, b.crow_indices.long(), b.col_indices, b.shape, b.block)
    with pytest.raises(ValueError, match="col_indices"):
        BlockCompressed(b.values, b.crow_indices, b.col_indices[:-1], b.shape, b.block)


# ---- save / load ---------------------------------------------------------------------------

def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
        return
    assert a.shape == b.shape and a.dtype == b.dtype
    if isinstance(a, NMCompressed):
        assert (a.n, a.m, a.dim) == (b.n, b.m, b.dim)
        assert torch.equal(a.values, b.values) and torch.equal(a.indices, b.indices)
    else:
        assert a.block == b.block
        for part in ("values", "crow_indices", "col_indices"):
            x, y = getattr(a, part), getattr(b, part)
            assert x.dtype == y.dtype and torch.equal(x, y)
    assert torch.equal(a.to_dense(), b.to_dense())


def sample_model():
    w1 = randn((32, 64), torch.float16, 11)
    w2 = randn((16, 24, 3, 3), torch.bfloat16, 12)
    w3 = randn((8, 40), torch.float32, 13)
    return {
        "fc.weight": compress_nm(w1, 2, 4, mask=nm_mask(w1, 2, 4)),
        "conv.weight": compress_block(w2, mask=torch.tensor([[True, False, True], [False, True, True]])),
        "fc2.weight": compress_nm(w3, 3, 8, dim=0, mask=nm_mask(w3, 3, 8, dim=0)),
        "fc.bias": randn((32,), torch.float16, 14),
        "steps": torch.tensor(7),
        "flags": torch.tensor([True, False]),
    }


@FAST
@given(nm_cases())
def test_save_load_nm_round_trip(tmp_path_factory, case):
    n, m, dim, shape, dtype, seed = case
    x = randn(shape, dtype, seed)
    c = compress_nm(x, n, m, dim, mask=nm_mask(x, n, m, dim))
    path = tmp_path_factory.mktemp("nm") / "w.safetensors"
    save(path, c)
    assert_same(load(path), c)


def test_save_load_single_and_dict(tmp_path):
    model = sample_model()
    for name, obj in model.items():
        if not isinstance(obj, torch.Tensor):
            save(tmp_path / "one.safetensors", obj)
            assert_same(load(str(tmp_path / "one.safetensors")), obj)
    save(tmp_path / "model.safetensors", model, metadata={"arch": "mlp", "epoch": "3"})
    back, meta = load(tmp_path / "model.safetensors", with_metadata=True)
    assert list(back) == list(model)
    for name in model:
        assert_same(back[name], model[name])
    assert meta == {"arch": "mlp", "epoch": "3"}
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "one.safetensors"]


def test_save_tied_and_noncontiguous_tensors(tmp_path):
    w = randn((8, 8), torch.float32, 15)
    obj = {"a": w, "tied": w, "t": w.t(), "view": w[2:4]}
    save(tmp_path / "t.safetensors", obj)
    back = load(tmp_path / "t.safetensors")
    for k in obj:
        assert torch.equal(back[k], obj[k])


def test_save_bad_inputs(tmp_path):
    path = tmp_path / "x.safetensors"
    with pytest.raises(TypeError, match="'w'.*list"):
        save(path, {"w": [1.0]})
    with pytest.raises(TypeError, match="obj"):
        save(path, 3.0)
    with pytest.raises(TypeError, match="keys"):
        save(path, {1: torch.zeros(2)})
    with pytest.raises(TypeError, match="metadata"):
        save(path, torch.zeros(2), metadata={"a": 1})
    with pytest.raises(ValueError, match="reserved"):
        save(path, torch.zeros(2), metadata={"nmsparse": "x"})
    c = compress_nm(torch.zeros(4, 4), 2, 4)
    with pytest.raises(ValueError, match="'a.values'"):
        save(path, {"a": c, "a.values": torch.zeros(1)})
    assert not path.exists() and os.listdir(tmp_path) == []


def test_load_missing_file(tmp_path):
    path = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load(path)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.safetensors"
    save(path, sample_model())
    return path, path.read_bytes()


def header_len(raw):
    return 8 + int.from_bytes(raw[:8], "little")


@pytest.mark.parametrize("cut", [0, 5, 8, 60, "header", "data-1"])
def test_load_truncated_file(saved, cut):
    path, raw = saved
    n = {"header": header_len(raw) - 10, "data-1": len(raw) - 1}.get(cut, cut)
    path.write_bytes(raw[:n])
    with pytest.raises(ValueError, match="model.safetensors"):
        load(path)


@pytest.mark.parametrize("where", ["length", "json-start", "json-middle", "json-end", "data"])
def test_load_flipped_bytes(saved, where):
    path, raw = saved
    h = header_len(raw)
    pos = {"length": 2, "json-start": 8, "json-middle": h // 2, "json-end": h - 2,
           "data": len(raw) - 3}[where]
    bad = bytearray(raw)
    bad[pos] ^= 0x5A
    path.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="model.safetensors"):
        load(path)


def test_load_edited_metadata_is_caught(saved):
    path, raw = saved
    # an edit that keeps the header valid JSON and valid UTF-8: change n of the 3:8 entry
    old = b'\\"n\\": 3, \\"m\\": 8'
    assert raw.count(old) == 1
    path.write_bytes(raw.replace(old, b'\\"n\\": 2, \\"m\\": 8'))
    with pytest.raises(ValueError, match="CRC"):
        load(path)


def test_load_foreign_files(tmp_path):
    from safetensors.torch import save_file
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(ValueError, match=r"foreign.safetensors.*nmsparse"):
        load(foreign)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a tensor file at all")
    with pytest.raises(ValueError, match="notes.txt"):
        load(text)


def test_failed_save_keeps_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save(path, sample_model())
    before = path.read_bytes()

    with pytest.raises(TypeError):
        save(path, {"w": "not a tensor"})
    assert path.read_bytes() == before

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)  # half-written output, then the process "fails"
        raise OSError("disk full")

    monkeypatch.setattr(fio, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save(path, {"w": torch.ones(3)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]
    monkeypatch.undo()
    assert list(load(path)) == list(sample_model())


# ---- size report ---------------------------------------------------------------------------

def test_size_report():
    model = sample_model()
    rep = size_report(model)
    rows = rep["entries"]
    assert set(rows) == set(model)
    fc = rows["fc.weight"]
    assert fc["values_bytes"] == 32 * 32 * 2 and fc["metadata_bytes"] == 32 * 32 * 2 // 8
    assert fc["ratio"] == pytest.approx(0.5625)
    conv = model["conv.weight"]
    assert rows["conv.weight"]["metadata_bytes"] == 4 * 3 + 2 * conv.nnzb
    assert rows["fc.bias"] == {"values_bytes": 64, "metadata_bytes": 0, "total_bytes": 64,
                               "dense_bytes": 64, "ratio": 1.0}
    for key in ("values_bytes", "metadata_bytes", "total_bytes", "dense_bytes"):
        assert rep[key] == sum(r[key] for r in rows.values())
    assert rep["ratio"] == pytest.approx(rep["total_bytes"] / rep["dense_bytes"])
    assert size_report(conv)["total_bytes"] == conv.nbytes
    with pytest.raises(TypeError, match="size_report"):
        size_report([1, 2])


def test_public_api():
    for name in ("NMCompressed", "compress_nm", "BlockCompressed", "compress_block", "save", "load",
                 "size_report"):
        assert name in nmsparse.formats.__all__ and hasattr(nmsparse, name)
