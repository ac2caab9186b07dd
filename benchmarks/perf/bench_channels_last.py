"""Does channels-last memory format speed up the U-Net training step on CPU?

Times forward + cross entropy + backward + Adam of the kidney benchmark's
``cpu``-profile trunk and segmentation tail (48 x 48 slices, batch 8, one
thread) in the default (contiguous) format and in channels-last, alternating
the two in rounds so machine load affects both alike, and prints the ratio.
``mtlbench.devices.memory_format`` uses channels-last on CPU because of it.

    python benchmarks/perf/bench_channels_last.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    import torch
    from torch import nn

    from mtlbench.config import load_config
    from mtlbench.engine.model import UNetTrunk

    cfg = load_config(ROOT / "benchmarks" / "kidney.toml", "cpu")
    torch.set_num_threads(1)
    h, w = cfg.preprocess.slice_size
    bs = cfg.train.batch_size

    def make(fmt: torch.memory_format) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.optim.Optimizer]:
        torch.manual_seed(0)
        trunk = UNetTrunk(1, cfg.model.widths, cfg.model.coordinates)
        tail = nn.Sequential(nn.Conv2d(trunk.out_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                             nn.ReLU(), nn.Conv2d(8, 3, 1))
        model = nn.Sequential(trunk, tail).to(memory_format=fmt)
        x = torch.randn(bs, 1, h, w).to(memory_format=fmt)
        y = torch.randint(0, 3, (bs, h, w))
        return model, x, y, torch.optim.Adam(model.parameters())

    def rate(setup: tuple) -> float:
        model, x, y, opt = setup
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return args.steps * bs / (time.perf_counter() - t0)

    plain, last = make(torch.contiguous_format), make(torch.channels_last)
    rate(plain), rate(last)  # warm-up
    r_plain, r_last = [], []
    for _ in range(args.rounds):
        r_plain.append(rate(plain))
        r_last.append(rate(last))
    a, b = statistics.median(r_plain), statistics.median(r_last)
    print(f"U-Net step, {h}x{w}, widths {cfg.model.widths}, batch {bs}, 1 thread, median of {args.rounds} rounds")
    print(f"contiguous: {a:.0f} slices/s   channels-last: {b:.0f} slices/s")
    print(f"channels-last / contiguous: {b / a:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
