"""From logits to the mask at the original size: `Segmenter._finish` with every class sampled at
every pixel (confidence=True, the path every mask took before the argmax shortcut) against the
argmax shortcut (confidence=False: classes sampled only where a pixel's corner cells disagree,
and only those that can win there).

    .venv/bin/python benchmarks/bench_upsample.py [--threads 2] [--repeats 5] [--large-repeats 1]

Cells: C = 21 and 150 classes; the logit grid of a whole-image view at R = 112 and 512 (the
Segmenter's own layout: resize, centre padding, 14 px cells); masks of 0.36 MP (480 x 640) and
12 MP (3000 x 4000). The logits are synthetic but shaped like a real head's: a 3 x 4 field of
random class scores (x4) bicubically upsampled to the grid, plus 0.05 of per-cell noise, about a
dozen regions per image. Median of the repeats after one warm-up (the every-class path at 12 MP:
--large-repeats runs, no warm-up); `sampled` is the fraction of pixels that had classes sampled
(a handful of the C each). CPU ms counts every thread (idle OpenMP workers spinning included).
A second table times the class counts of a mask on the CPU: np.bincount (what Predict did on the
host) and torch.bincount (what predict(class_counts=True) does on the device, before the copy
back). Prints markdown tables; about 1-2 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from machine import core_count, cpu_model  # noqa: E402  (benchmarks/ is the script's folder)

OUTPUTS = {"0.36 MP": (480, 640), "12 MP": (3000, 4000)}
RESOLUTIONS = (112, 512)
CLASS_COUNTS = (21, 150)


def median_ms(fn, repeats: int, warm_up: bool = True):
    """Median wall and CPU (all threads) milliseconds of fn() over `repeats`, and its last result."""
    result = fn() if warm_up else None
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu), result


def segmenter(num_classes: int, resolution: int):
    """A Segmenter with `num_classes` (its backbone is never run here: only `_finish` is timed)."""
    from model.backbone import BackboneConfig, build_backbone
    from model.classes import ClassMap, default_color
    from model.heads import HeadConfig, LinearHead
    from model.segmenter import InferenceConfig, Segmenter

    tiny = BackboneConfig("tiny", 48, 1, 3)
    head = LinearHead(HeadConfig("linear", (0,), tiny.embed_dim, num_classes))
    classes = ClassMap(tuple(f"c{i}" for i in range(num_classes)), tuple(default_color(i) for i in range(num_classes)))
    config = InferenceConfig(resolution=resolution, precision="fp32")
    return Segmenter(build_backbone(tiny), head, classes, config, device="cpu")


def pieces_with_logits(seg, hw: tuple[int, int], seed: int):
    """The whole-image piece the Segmenter makes for an image of size hw, with synthetic logits."""
    import torch
    import torch.nn.functional as F

    (piece, padded), *_ = seg._pieces(0, torch.zeros(3, 1, 1), hw)  # views follow the output size
    grid = (padded.shape[-2] // 14, padded.shape[-1] // 14)
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, seg.num_classes, 3, 4, generator=g) * 4
    logits = F.interpolate(coarse, size=grid, mode="bicubic", align_corners=False)[0]
    piece.logits = logits + 0.05 * torch.randn(logits.shape, generator=g)
    return [piece]


def upsample_table(args) -> list[str]:
    import numpy as np
    import torch

    from model.argmax import argmax_mask

    lines = [
        "| classes | R | logit grid | output | every class (confidence=True) ms | shortcut (confidence=False) ms "
        "| speed-up | CPU ms every class / shortcut | sampled |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for c in CLASS_COUNTS:
        for r in RESOLUTIONS:
            seg = segmenter(c, r)
            for name, hw in OUTPUTS.items():
                pieces = pieces_with_logits(seg, hw, seed=c + r)
                large = hw[0] * hw[1] > 1e6  # the every-class path takes seconds there: one run, no warm-up
                full, full_cpu, old = median_ms(
                    lambda s=seg, h=hw, p=pieces: s._finish(h, p, True, False),
                    args.large_repeats if large else args.repeats,
                    warm_up=not large,
                )
                fast, fast_cpu, new = median_ms(
                    lambda s=seg, h=hw, p=pieces: s._finish(h, p, False, False), args.repeats
                )
                mask = torch.empty(hw, dtype=torch.uint8)
                fraction = argmax_mask(pieces, hw, seg.config.strip_bytes, mask) / (hw[0] * hw[1])
                same = np.array_equal(old.mask, new.mask)
                grid = "x".join(str(n) for n in pieces[0].logits.shape[-2:])
                lines.append(
                    f"| {c} | {r} | {grid} | {name} | {full:.1f} | {fast:.1f} | {full / fast:.1f}x "
                    f"| {full_cpu:.0f} / {fast_cpu:.0f} | {100 * fraction:.1f}%{'' if same else ' (MASKS DIFFER)'} |"
                )
                print(lines[-1], flush=True)
    return lines


def counts_table(args) -> list[str]:
    """Class counts of a mask on the CPU: np.bincount (what Predict did) against torch.bincount
    (what Segmenter.predict(class_counts=True) does, before the copy back)."""
    import numpy as np
    import torch

    lines = ["| mask | np.bincount ms | torch.bincount ms |", "|---|---:|---:|"]
    rng = np.random.default_rng(0)
    for name, (h, w) in OUTPUTS.items():
        mask = np.repeat(rng.integers(0, 150, (h, w // 16), dtype=np.uint8), 16, axis=1)  # runs of 16 pixels
        tensor = torch.from_numpy(mask).flatten()
        one = median_ms(lambda m=mask: np.bincount(m.ravel(), minlength=150), args.repeats)[0]
        torch_ms = median_ms(lambda t=tensor: torch.bincount(t, minlength=150), args.repeats)[0]
        assert np.array_equal(torch.bincount(tensor, minlength=150).numpy(), np.bincount(mask.ravel(), minlength=150))
        lines.append(f"| {name} | {one:.2f} | {torch_ms:.2f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per 0.36 MP cell")
    parser.add_argument("--large-repeats", type=int, default=1, help="timed runs of the every-class path at 12 MP")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load = os.getloadavg()[0]
    print(
        f"machine: {cpu_model()}, {core_count()} cores (load {load:.1f}); torch {torch.__version__}, {args.threads} threads"
    )
    upsample = upsample_table(args)
    counts = counts_table(args)
    print("\n" + "\n".join(upsample) + "\n\n" + "\n".join(counts))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
