"""`train`'s defaults against a small grid of learning rates and budgets, on a synthetic set of a
given size: do the defaults get close to the best head the set allows? Same random ViT-S/14 for
every run, one feature pass shared by all of them (the grid only changes the head's training).

    .venv/bin/python benchmarks/bench_train_defaults.py [--images 96] [--val 32]
        [--lrs 0.001,0.003,0.01,0.03] [--steps 100,300,1000] [--resolution 224 --crop 224]

(benchmarks/RESULTS.md has the coarser grids that fit a 2-core CPU, and their commands.)

Rows: `defaults` (no --lr/--steps/--epochs), `old defaults` (--epochs 40 --lr 1e-3, the defaults
before issue 14), then one per lr x steps. Prints a table (best validation mIoU over the run's
epochs, which is the head.pt a run keeps, and wall seconds) and a JSON line; the gap is the best
of the grid minus the defaults' mIoU.
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


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=96, help="training images")
    ap.add_argument("--val", type=int, default=32, help="validation images")
    ap.add_argument("--size", type=int, default=112, help="synthetic images' short side (dinoseg synthetic's default)")
    ap.add_argument("--resolution", type=int, default=None, help="--resolution for every run (default: train's)")
    ap.add_argument("--crop", type=int, default=None, help="--crop for every run (default: train's)")
    ap.add_argument("--lrs", default="0.001,0.003,0.01,0.03")
    ap.add_argument("--steps", default="100,300,1000", help="budgets of the grid, in optimizer steps")
    ap.add_argument("--no-old", action="store_true", help="leave out the old defaults' row")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="the synthetic set's seed")
    args = ap.parse_args()

    import ray

    from pipeline.data.synthetic import write_synthetic
    from pipeline.train import TrainConfig, run_train

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-defaults-"))
    data = tmp / "data"
    write_synthetic(str(data), train=args.images, val=args.val, size=args.size, seed=args.seed)
    fixed = {k: v for k, v in (("resolution", args.resolution), ("crop", args.crop)) if v is not None}
    rows = [("defaults", {})]
    if not args.no_old:
        rows.append(("old defaults", {"epochs": 40, "lr": 1e-3}))
    rows += [
        (f"lr {lr:g}, {int(s)} steps", {"lr": lr, "steps": int(s)})
        for s in floats(args.steps)
        for lr in floats(args.lrs)
    ]

    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = []
    try:
        for i, (name, options) in enumerate(rows):
            t0 = time.time()
            info = run_train(
                TrainConfig(
                    f"{data}/train/images",
                    f"{data}/train/masks",
                    f"{data}/classes.yaml",
                    str(tmp / f"run{i}"),
                    val_images=f"{data}/val/images",
                    val_masks=f"{data}/val/masks",
                    backbone_weights="random",
                    workers=args.workers,
                    cache_dir=str(tmp / "cache"),  # one feature pass for all runs (the first one's)
                    **fixed,
                    **options,
                )
            )
            wall = time.time() - t0
            p = info["plan"]
            row = {
                "run": name,
                "options": options,
                "steps": p["steps"],
                "epochs": p["epochs"],
                "lr": p["lr"],
                "best_miou": info["best"]["miou"],
                "best_epoch": info["best"]["epoch"],
                "last_miou": info["history"][-1]["val_miou"],
                "wall": round(wall, 1),
                "train_seconds": round(sum(r["seconds"] for r in info["history"]), 1),
            }
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)  # progress: a grid takes a while
    finally:
        ray.shutdown()

    settings = results[0]
    grid = [r for r in results if r["run"] not in ("defaults", "old defaults")]
    best = max(grid, key=lambda r: r["best_miou"]) if grid else settings
    gap = best["best_miou"] - settings["best_miou"]
    res = fixed.get("resolution", TrainConfig.resolution)
    print(f"{cpu_model()}, {core_count()} cores")
    print(
        f"synthetic set: {args.images} train, {args.val} val images of {args.size} px; dinov2_vits14 (random), "
        f"linear head, resolution {res}, crop {fixed.get('crop', TrainConfig.crop)}, batch {TrainConfig.batch_size}, "
        f"{args.workers} worker(s)"
    )
    print(f"{'run':<24} {'steps':>6} {'epochs':>6} {'lr':>8} {'val mIoU':>8} {'(last)':>7} {'seconds':>8}")
    for r in results:
        print(
            f"{r['run']:<24} {r['steps']:>6} {r['epochs']:>6} {r['lr']:>8.2g} {r['best_miou']:>8.3f} "
            f"{r['last_miou']:>7.3f} {r['wall']:>8.1f}"
        )
    print(
        f"best of the grid: {best['run']} {best['best_miou']:.3f}; defaults {settings['best_miou']:.3f}, gap {gap:.3f}"
    )
    print(json.dumps({"args": vars(args), "results": results, "best": best["run"], "gap": round(gap, 4)}))


if __name__ == "__main__":
    main()
