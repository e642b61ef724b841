"""How far apart `bench step` can put methods that are the same: K identical dense copies, timed as it times methods.

Every copy is the same dense model with its own fused AdamW; the timed steps run in rounds (each copy `block`
steps per round, the order shuffled per round when --shuffle). Printed per copy: the ratio of its whole-run
median to copy 0's (what `bench step` reported before the rounds were paired) and the paired ratio (median
over rounds of its block over copy 0's block of the same round: what it reports now), then every step in ms.
Any ratio away from 1.00 is the measurement's own spread: no method is involved.

Usage: python scripts/identical_copies.py resnet18|gpt K STEPS [--block B] [--shuffle]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import time

import torch

from nmsparse.bench.step import StepOptions, _batch, _build, _train_step, make_optimizer
from nmsparse.bench.timing import paired_ratio


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", choices=("resnet18", "gpt"))
    p.add_argument("copies", type=int)
    p.add_argument("steps", type=int)
    p.add_argument("--block", type=int, default=1)
    p.add_argument("--shuffle", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    o = StepOptions()
    torch.manual_seed(0)
    base = _build(a.model, o).train()
    x, y = _batch(a.model, o, torch.Generator().manual_seed(0))
    copies = []
    for _ in range(a.copies):
        model = copy.deepcopy(base)
        opt = make_optimizer(model, o)
        for _ in range(3):  # warm-up
            _train_step(model, opt, x, y)
        copies.append((model, opt, []))
    rng = random.Random(0)
    for start in range(0, a.steps, a.block):
        order = list(copies)
        if a.shuffle:
            rng.shuffle(order)
        for model, opt, times in order:
            for _ in range(min(a.block, a.steps - start)):
                t0 = time.perf_counter()
                _train_step(model, opt, x, y)
                times.append(time.perf_counter() - t0)
    first = copies[0][2]
    whole = [statistics.median(t) / statistics.median(first) for _, _, t in copies]
    paired = [paired_ratio(t, first, a.block) for _, _, t in copies]
    print(f"{a.model}: {a.copies} copies, {a.steps} steps, block {a.block}, shuffle {a.shuffle}")
    print(f"ratio of whole-run medians to copy 0: {' '.join(f'{v:.3f}' for v in whole)} (max/min "
          f"{max(whole) / min(whole):.3f})")
    print(f"paired ratio to copy 0:               {' '.join(f'{v:.3f}' for v in paired)} (max/min "
          f"{max(paired) / min(paired):.3f})")
    for i, (_, _, t) in enumerate(copies):
        print(f"copy {i} ms: " + " | ".join(" ".join(f"{v * 1e3:.0f}" for v in t[b:b + a.block])
                                            for b in range(0, len(t), a.block)))


if __name__ == "__main__":
    main()
