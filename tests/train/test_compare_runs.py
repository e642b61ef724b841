"""`nmsparse compare`: run directories never clash, everything is checked before training, clear N:M columns."""

import csv
from pathlib import Path

import matplotlib.axes
import pytest
import yaml

from nmsparse.cli import main as cli
from nmsparse.train.compare import distinct_names, expand_sweeps, format_table, nm_columns, plan_runs
from nmsparse.train.config import config_from_dict, load_config
from nmsparse.train.plots import plot_curves

ROOT = Path(__file__).resolve().parents[2]
DIGITS = ROOT / "configs" / "digits-dense.yaml"


def write(tmp_path, stem, **changes):
    d = yaml.safe_load(DIGITS.read_text())
    d.update({"epochs": 1, "progress": False, **changes})
    path = tmp_path / f"{stem}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def test_configs_sharing_a_name_get_their_file_stem(tmp_path, capsys):
    a = write(tmp_path, "base")
    b = write(tmp_path, "lr05", optim={**yaml.safe_load(DIGITS.read_text())["optim"], "lr": 0.05})
    out = tmp_path / "cmp"
    assert cli(["compare", str(a), str(b), "--seeds", "1", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["digits-dense--base", "digits-dense--lr05"]
    table = (out / "compare.md").read_text()
    assert "| digits dense (base) |" in table and "| digits dense (lr05) |" in table
    lr = {name: yaml.safe_load((out / name / "seed0" / "config.yaml").read_text())["optim"]["lr"]
          for name in ("digits-dense--base", "digits-dense--lr05")}
    assert lr == {"digits-dense--base": 0.1, "digits-dense--lr05": 0.05}


def test_unseparable_clashes_are_refused_before_training(tmp_path, capsys):
    a = write(tmp_path, "base")
    out = tmp_path / "cmp"
    assert cli(["compare", str(a), str(a), "--seeds", "1", "--out", str(out)]) == 2
    assert "are the same file, so their runs would share one directory" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    b = write(other, "base", seed=5)
    assert cli(["compare", str(a), str(b), "--seeds", "1", "--out", str(out)]) == 2
    assert "have the same name and the same file name" in capsys.readouterr().err
    assert not out.exists()
    # The API: two dicts with one name are refused, naming both.
    d = load_config(a).to_dict()
    with pytest.raises(ValueError, match=r"configs 1 \('digits dense'\) and 2 \('Digits Dense'\) would both train"):
        plan_runs([d, {**d, "name": "Digits Dense"}], 1, out)
    assert distinct_names([d, {**d, "name": "x"}], ["a.yaml", "b.yaml"])[0]["name"] == "digits dense"


def test_a_bad_later_config_fails_before_the_first_trains(tmp_path, capsys):
    a = write(tmp_path, "base")
    out = tmp_path / "cmp"
    assert cli(["compare", str(a), "--seeds", "1", "--sweep", "optim.lr=0.1,-1", "--out", str(out)]) == 2
    assert "config.optim.lr must be a finite number > 0, got -1.0 (config 2, 'digits dense lr=-1')" in \
        capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
def test_existing_checkpoints_are_checked_before_training(tmp_path, capsys):
    a = write(tmp_path, "base")
    out = tmp_path / "cmp"
    assert cli(["compare", str(a), "--seeds", "1", "--sweep", "optim.lr=0.1,0.05", "--out", str(out)]) == 0
    first = out / "digits-dense-lr-0.1" / "seed0"
    before = (first / "metrics.jsonl").read_bytes()
    # epochs=2 under onecycle cannot resume the 1-epoch runs: refused before the first run retrains.
    assert cli(["compare", str(a), "--seeds", "1", "--sweep", "optim.lr=0.1,0.05", "--set", "epochs=2",
                "--out", str(out)]) == 2
    assert "onecycle schedule, whose learning rate depends" in capsys.readouterr().err
    assert (first / "metrics.jsonl").read_bytes() == before
    assert cli(["compare", str(a), "--seeds", "1", "--sweep", "optim.lr=0.1,0.05", "--set", "epochs=2",
                "--out", str(out), "--restart"]) == 0
    assert len((first / "metrics.jsonl").read_text().splitlines()) == 2


def test_weight_and_grad_nm_columns():
    base = yaml.safe_load(DIGITS.read_text())
    both = config_from_dict({**base, "sparsity": {"weight": {"kind": "nm", "n": 4, "m": 8, "transposable": True},
                                                  "grad": {"n": 1, "m": 4}}})
    assert nm_columns(both) == ("4:8-T", "1:4")
    assert nm_columns(config_from_dict(base)) == ("-", "-")
    block = config_from_dict({**base, "sparsity": {"weight": {"kind": "block", "block": [8, 8], "sparsity": 0.5}}})
    assert nm_columns(block) == ("block 8x8 50%", "-")
    table = format_table([{"name": "x", "pattern": "SR-STE 4:8-T + SDGP rescale 1:4", "weight_nm": "4:8-T",
                           "grad_nm": "1:4", "mean": 99.0, "std": 0.1, "seeds": 2}])
    assert table.splitlines()[0] == "| run | pattern | weight N:M | SDGP grad N:M | top-1 (%) mean +- std | seeds |"
    assert "| 4:8-T | 1:4 | 99.00 +- 0.10 | 2 |" in table


def test_compare_csv_has_both_columns(tmp_path):
    a = write(tmp_path, "base", sparsity={"weight": {"kind": "nm", "n": 2, "m": 4}, "grad": {"n": 1, "m": 4}})
    out = tmp_path / "cmp"
    assert cli(["compare", str(a), "--seeds", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "compare.csv")))
    assert rows[0]["weight_nm"] == "2:4" and rows[0]["grad_nm"] == "1:4"


@pytest.mark.parametrize("epochs,marker", [(1, "o"), (60, None)])
def test_short_curves_have_markers(tmp_path, monkeypatch, epochs, marker):
    seen = []
    real = matplotlib.axes.Axes.plot

    def record(self, *args, **kwargs):
        seen.append(kwargs.get("marker"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", record)
    rows = [{"epoch": e + 1, "train_loss": 1.0 / (e + 1), "test_acc": 50.0 + e / 2} for e in range(epochs)]
    plot_curves({"run": [rows]}, tmp_path / "c.png")
    assert seen == [marker, marker] and (tmp_path / "c.png").stat().st_size > 1000


@pytest.mark.slow
def test_train_and_report_run_without_matplotlib(tmp_path, no_matplotlib, capsys):
    # A base install (no [plot] extra): the main job and its report run, and one line says how to get the plots.
    out = tmp_path / "default"
    assert cli(["train", "--out", str(out), "--set", "epochs=1", "--set", "progress=false"]) == 0
    text = capsys.readouterr().out
    hints = [line for line in text.splitlines() if "matplotlib" in line]
    assert len(hints) == 1 and "pip install 'nmsparse[plot]'" in hints[0], text
    assert (out / "compare.md").exists() and not (out / "compare.png").exists()
    assert "compare.png" not in text
    assert cli(["report", str(out / "digits-dense" / "seed0")]) == 0
    text = capsys.readouterr().out
    hints = [line for line in text.splitlines() if "matplotlib" in line]
    assert len(hints) == 1 and "pip install 'nmsparse[plot]'" in hints[0] and "| epoch |" in text
    assert not (out / "digits-dense" / "seed0" / "curves.png").exists()


def fmnist(stem: str, *sets) -> dict:
    return load_config(ROOT / "configs" / "fmnist" / f"{stem}.yaml", list(sets)).to_dict()


def sweep_names(d: dict, *sweeps) -> list[str]:
    return [v["name"] for v in expand_sweeps(d, list(sweeps))]


def test_sweep_names_state_the_swept_value_without_contradiction():
    # The name's N:M (or method, block sparsity) is replaced by the swept one, not contradicted by a suffix.
    rescale = fmnist("sdgp-rescale-2-4")
    assert sweep_names(rescale, "sparsity.grad.nm=1:4,2:4") == ["fmnist SDGP rescale 1:4", "fmnist SDGP rescale 2:4"]
    assert sweep_names(rescale, "sparsity.grad.method=random,magnitude") == \
        ["fmnist SDGP rnd 2:4", "fmnist SDGP max 2:4"]  # methods as configs/ names spell them
    assert sweep_names(fmnist("sdgp-max-2-4"), "sparsity.grad.method=random") == ["fmnist SDGP rnd 2:4"]
    assert sweep_names(rescale, "sparsity.grad.nm=1:4", "sparsity.grad.method=magnitude") == ["fmnist SDGP max 1:4"]
    assert sweep_names(fmnist("transposable-4-8t"), "sparsity.weight.nm=2:4") == ["fmnist transposable 2:4-T"]
    assert sweep_names(fmnist("srste-2-4"), "sparsity.weight.method=ste") == ["fmnist STE 2:4"]
    assert sweep_names(fmnist("block-8x8-50"), "sparsity.weight.sparsity=0.75") == ["fmnist block 8x8 75%"]
    # What the name does not state, or states ambiguously, is added with its section.
    assert sweep_names(fmnist("dense"), "sparsity.grad.nm=1:4") == ["fmnist dense grad.nm=1:4"]
    assert sweep_names(rescale, "sparsity.grad.layers=conv+linear") == ["fmnist SDGP rescale 2:4 grad.layers=conv+linear"]
    both = {**rescale, "name": "x SR-STE 2:4 + SDGP 2:4",
            "sparsity": {"weight": {"kind": "nm", "n": 2, "m": 4}, "grad": {"n": 2, "m": 4}}}
    assert sweep_names(both, "sparsity.grad.nm=1:4") == ["x SR-STE 2:4 + SDGP 2:4 grad.nm=1:4"]
    assert sweep_names(rescale, "optim.lr=0.05") == ["fmnist SDGP rescale 2:4 lr=0.05"]  # other keys: as before
    # --set does the same.
    assert load_config(ROOT / "configs" / "fmnist" / "sdgp-rescale-2-4.yaml", ["sparsity.grad.n=1"]).name == \
        "fmnist SDGP rescale 1:4"
