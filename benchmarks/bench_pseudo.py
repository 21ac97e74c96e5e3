"""Pseudo-labelling: the model pass vs the selection pass, and what changing the rule costs.

    .venv/bin/python benchmarks/bench_pseudo.py [--images 64] [--size 448]

One run, side by side on the same images and Ray: (1) `pseudo-label --threshold 0.9` from
nothing (model pass + selection), (2) the same command again (everything skipped), (3)
`--class-balanced 0.5` on the same output (histogram pass + selection, no model). Prints a
table and a JSON line; the point is the ratio of (1) to (3): retuning the rule must not cost
the model pass again. Step (4) re-selects with `--threshold 0.7` (selection only, no histogram).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from machine import core_count, cpu_model  # noqa: E402  (benchmarks/ is the script's folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=448, help="short side of the synthetic images")
    ap.add_argument("--resolution", type=int, default=448)
    args = ap.parse_args()

    import ray
    import torch

    from model.checkpoint import HeadCheckpoint, save_head_checkpoint
    from model.heads import HeadConfig, LinearHead
    from pipeline.data.synthetic import SYNTHETIC_CLASSES, write_synthetic
    from pipeline.label import PseudoLabelConfig, run_pseudo_label
    from pipeline.segment import SegmentConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-pseudo-"))
    write_synthetic(str(tmp / "data"), train=args.images, val=0, size=args.size, seed=0)
    torch.manual_seed(0)
    head = LinearHead(HeadConfig("linear", (11,), 384, len(SYNTHETIC_CLASSES)))
    for p in head.parameters():  # confident enough that the rules keep some pixels and write masks
        p.data.normal_(0, 0.5)
    save_head_checkpoint(
        HeadCheckpoint("dinov2_vits14", head.config, SYNTHETIC_CLASSES, head.state_dict(), resolution=args.resolution),
        str(tmp / "head.pt"),
    )
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    seg = SegmentConfig(
        f"{tmp}/data/train/images", str(tmp / "out"), model=None, head=str(tmp / "head.pt"), backbone_weights="random"
    )
    steps = {}
    try:
        for name, rule in (
            ("first run (model + selection)", {"threshold": 0.9}),
            ("same command again", {"threshold": 0.9}),
            ("new rule: class-balanced 0.5", {"class_balanced": 0.5}),
            ("new rule: threshold 0.7", {"threshold": 0.7}),
        ):
            t0 = time.time()
            result = run_pseudo_label(PseudoLabelConfig(seg, **rule))
            steps[name] = {"seconds": round(time.time() - t0, 1), "model": result["model"], "counts": result["counts"]}
    finally:
        ray.shutdown()
    first, third = (steps[k]["seconds"] for k in ("first run (model + selection)", "new rule: class-balanced 0.5"))
    print(
        f"{args.images} images, short side {args.size}, inference at {args.resolution}, dinov2_vits14 (random) + linear head, "
        f"CPU: {cpu_model()} ({core_count()} cores)"
    )
    for name, s in steps.items():
        print(
            f"  {name:<32} {s['seconds']:>7.1f} s   predicted {s['model']['predicted']:>4}  pairs {s['counts']['pairs']:>4}"
        )
    print(f"  re-selecting with a new rule: {first / third:.1f}x faster than the first run")
    print(
        json.dumps(
            {
                "images": args.images,
                "size": args.size,
                "steps": steps,
                "ratio_first_to_reselect": round(first / third, 2),
                "cpu": cpu_model(),
                "cores": core_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
