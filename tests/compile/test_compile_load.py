"""Compact files run on their own: rebuild, load, block-sparse execution, eval; compile's path checks."""

import pytest
import torch
from torch import nn

from nmsparse.cli import main
from nmsparse.compile import (compile_model, compile_to_dir, evaluate_compiled, load_compact, load_compact_state,
                              load_executable)
from nmsparse.prune import prune_blocks
from nmsparse.compile.runtime import BlockSparseConv2d, BlockSparseLinear


@pytest.fixture(scope="module")
def digits_ckpt(tmp_path_factory):
    from nmsparse.train.config import load_config
    from nmsparse.train.loop import train

    out = tmp_path_factory.mktemp("digits")
    train(load_config("configs/digits-dense.yaml", ["epochs=2", "progress=false"]), out, log=lambda *a: None)
    return out / "checkpoint.pt"


def test_checkpoint_compile_load_run_and_eval(digits_ckpt, tmp_path, capsys):
    from nmsparse.train.evaluate import load_trained

    _, model, *_ = load_trained(digits_ckpt, "cpu")
    prune_blocks(model, 0.5)
    pruned = tmp_path / "pruned.pt"
    from nmsparse.train.checkpoint import load_checkpoint, save_checkpoint

    state = load_checkpoint(digits_ckpt)
    save_checkpoint(pruned, {**state, "model": model.state_dict()})
    out = tmp_path / "build"
    compiled, _ = compile_to_dir(pruned, "cpu", out, charts=False, measure=False)
    net, info = load_executable(out)  # the directory, or the file inside it
    assert info["arch"]["kind"] == "checkpoint"
    kinds = {type(m) for m in net.modules()}
    assert BlockSparseConv2d in kinds or BlockSparseLinear in kinds
    x = torch.randn(4, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-5)
    # accuracy of the compact model equals the pruned checkpoint's
    from nmsparse.train.evaluate import evaluate_checkpoint

    res = evaluate_compiled(out / "model.safetensors")
    assert res["test_acc"] == pytest.approx(evaluate_checkpoint(pruned, "cpu")["test_acc"])
    assert main(["eval", str(out)]) == 0
    assert f"test top-1 {res['test_acc']:.2f}%" in capsys.readouterr().out


def test_model_name_is_reproducible_and_rebuilds(tmp_path):
    a, _ = compile_to_dir("small_cnn", "aie2", tmp_path / "a", prune=0.5, charts=False)
    b, _ = compile_to_dir("small_cnn", "aie2", tmp_path / "b", prune=0.5, charts=False)
    c, _ = compile_to_dir("small_cnn", "aie2", tmp_path / "c", prune=0.5, charts=False, seed=1)
    (sa, ia), (sb, ib), (sc, _) = (load_compact_state(tmp_path / d) for d in "abc")
    assert ia == ib and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.totals()["time_s"] == b.totals()["time_s"]
    net, info = load_executable(tmp_path / "a")
    assert info["arch"] == {"kind": "name", "name": "small_cnn"}
    with torch.no_grad():
        x = torch.randn(2, 1, 28, 28)
        torch.testing.assert_close(net(x), a.model.eval()(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no test set"):
        evaluate_compiled(tmp_path / "a")


def test_python_module_needs_the_architecture(tmp_path):
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 8))
    prune_blocks(net, 0.5, dense_first=False)
    compiled = compile_model(net, "aie2", (1, 8, 6, 6))
    compiled.save(tmp_path, charts=False)
    with pytest.raises(ValueError, match="pass model=<an instance of the same architecture>"):
        load_executable(tmp_path)
    other = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 8))
    run, _ = load_executable(tmp_path / "model.safetensors", model=other)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(run(x), net.eval()(x), rtol=1e-4, atol=1e-5)
    wrong = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="does not fit the model"):
        load_executable(tmp_path, model=wrong)


def test_compile_path_errors(digits_ckpt, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty").mkdir()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x89PNG\r\n" + bytes(200))
    cases = [
        (["compile", str(digits_ckpt.parent), "--out", str(tmp_path / "o")], "is a directory: pass a checkpoint.pt"),
        (["compile", "small_cnn", "--prune", "0.5", "--out", str(tmp_path / "afile")], "is an existing file"),
        (["compile", "small_cnn", "--prune", "0.5", "--out", str(tmp_path / "afile" / "x")], "is a file, not a directory"),
        (["compile", str(junk), "--out", str(tmp_path / "o")], "cannot be loaded as a PyTorch checkpoint"),
        (["compile", "resnet5", "--out", str(tmp_path / "o")], "did you mean 'resnet50'?"),
        (["eval", str(tmp_path / "empty" / "model.safetensors")], "does not exist"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err, (argv, err)
    with pytest.raises(ValueError, match="directory without model.safetensors"):
        load_compact(tmp_path / "empty")


def test_edited_compile_metadata_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 8))
    prune_blocks(net, 0.5, dense_first=False)
    compile_model(net, "aie2", (1, 8, 6, 6)).save(tmp_path, charts=False)
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    assert '"format": "block"' in meta["nmsparse.compiled"]
    meta["nmsparse.compiled"] = meta["nmsparse.compiled"].replace('"format": "block"', '"format": "dense"')
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=meta)
    with pytest.raises(ValueError, match=r"edited.safetensors: its 'nmsparse.compiled' metadata .* CRC-32"):
        load_compact(edited)


def test_save_links_charts_and_cpu_block_size(tmp_path):
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 8))
    prune_blocks(net, 0.5, dense_first=False)
    with pytest.raises(ValueError, match="cpu target's kernels and cost model run 8x8 blocks only"):
        compile_model(net, "cpu", (1, 8, 6, 6), block=(16, 8), measure=False)
    compiled = compile_model(net, "aie2", (1, 8, 6, 6))
    pytest.importorskip("matplotlib")
    paths = compiled.save(tmp_path, charts=True)
    report = (tmp_path / "report.md").read_text()
    assert "(layers.png)" in report and (tmp_path / "layers.png").exists(), paths
    compiled.save(tmp_path, charts=False)  # charts of the earlier run go, the report no longer links them
    assert not (tmp_path / "layers.png").exists() and "(layers.png)" not in (tmp_path / "report.md").read_text()


def test_binary_profile_file_is_named(tmp_path):
    from nmsparse.compile import ProfileError, load_target

    img = tmp_path / "img.yaml"
    img.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(ProfileError, match=r"img.yaml is not a text file"):
        load_target(str(img))


def test_compile_summary_says_when_sparse_layers_run_dense(tmp_path, capsys):
    import json

    assert main(["compile", "small_cnn", "--prune", "0.5", "--target", "gpu", "--out", str(tmp_path),
                 "--no-charts"]) == 0
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "plan.json").read_text())
    stored = [p for p in plan["layers"] if p["format"]["kind"] in ("block", "nm")]
    dense = [p for p in stored if p["decision"] != "sparse"]
    assert stored
    if dense:
        assert f"{len(dense)} of the {len(stored)} sparse layers run dense on" in out
    else:
        assert "run dense on" not in out
