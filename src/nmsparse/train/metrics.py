"""Run logs: one JSON line and one CSV row per epoch, TensorBoard when it is installed."""

from __future__ import annotations

import csv
import json
from pathlib import Path


class MetricsLog:
    """Appends epoch rows to metrics.jsonl and metrics.csv in `out_dir` (rank 0 only)."""

    def __init__(self, out_dir: Path | None, enabled: bool = True):
        self.out_dir = Path(out_dir) if out_dir is not None and enabled else None
        self.tb = None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out_dir / "tb"))
            except (ImportError, ModuleNotFoundError):
                self.tb = None

    def rewrite(self, rows: list[dict]) -> None:
        """Replace both files with `rows` (a checkpoint's history: the record of what the run has done)."""
        if self.out_dir is None:
            return
        (self.out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        self._write_csv(rows)

    def log(self, row: dict) -> None:
        if self.out_dir is None:
            return
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self._write_csv(read_metrics(self.out_dir))
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()

    def _write_csv(self, rows: list[dict]) -> None:
        if not rows:
            (self.out_dir / "metrics.csv").write_text("")
            return
        with open(self.out_dir / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
