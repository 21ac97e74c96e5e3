"""Per-epoch training time with the feature cache vs recomputing features (--no-cache), same
synthetic data, same head, same Ray, one run after the other. `--modes cache,streamed` compares
a cache held in the object store (the default when it fits) with one read every epoch; both
modes then share one feature pass.

    .venv/bin/python benchmarks/bench_train.py [--images 96] [--resolution 448] [--epochs 3]
        [--modes cache,no-cache]

Prints a table and a JSON line: seconds per epoch (from metrics.jsonl), the feature pass, and
the ratio of epochs after the first (the aim: cached >= 10x faster per epoch).
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
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--val", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=448)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--backbone", default="dinov2_vits14")
    ap.add_argument("--modes", default="cache,no-cache", help="comma-separated: cache, streamed, no-cache")
    args = ap.parse_args()
    modes = args.modes.split(",")
    assert set(modes) <= {"cache", "streamed", "no-cache"}, args.modes

    import ray

    import pipeline.train.data as train_data
    from pipeline.data.synthetic import write_synthetic
    from pipeline.train import TrainConfig, run_train

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    write_synthetic(str(tmp / "data"), train=args.images, val=args.val, size=args.resolution, seed=0)
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    share = train_data.MEMORY_SHARE
    try:
        for mode in modes:
            out = tmp / mode
            # "streamed": a cache never held in memory, read from its Parquet parts every epoch
            train_data.MEMORY_SHARE = 0.0 if mode == "streamed" else share
            t0 = time.time()
            info = run_train(
                TrainConfig(
                    f"{tmp}/data/train/images",
                    f"{tmp}/data/train/masks",
                    f"{tmp}/data/classes.yaml",
                    str(out),
                    val_images=f"{tmp}/data/val/images",
                    val_masks=f"{tmp}/data/val/masks",
                    backbone=args.backbone,
                    backbone_weights="random",
                    resolution=args.resolution,
                    crop=args.resolution,
                    epochs=args.epochs,
                    batch_size=8,
                    lr=0.03,
                    cache=mode != "no-cache",
                    workers=args.workers,
                    cache_dir=str(tmp / "cache"),
                )
            )
            wall = time.time() - t0
            epochs = [r["seconds"] for r in info["history"]]
            train_part = [r["train_seconds"] for r in info["history"]]
            results[mode] = {
                "wall": round(wall, 1),
                "epochs": epochs,
                "train_part": train_part,
                "before_training": round(wall - sum(epochs), 1),
                "best_miou": info["best"]["miou"],
            }
    finally:
        ray.shutdown()
    later = {m: sum(r["epochs"][1:]) / max(1, len(r["epochs"]) - 1) for m, r in results.items()}
    later_train = {m: sum(r["train_part"][1:]) / max(1, len(r["train_part"]) - 1) for m, r in results.items()}
    print(f"{cpu_model()}, {core_count()} cores")
    print(f"{args.images} images, resolution {args.resolution}, {args.backbone} (random), {args.workers} worker(s)")
    print(f"{'mode':<9} {'wall s':>7} {'before epochs s':>15} {'epoch s (each)':>28} {'val mIoU':>8}")
    for m, r in results.items():
        print(f"{m:<9} {r['wall']:>7} {r['before_training']:>15} {str(r['epochs']):>28} {r['best_miou']:>8.3f}")
    base = modes[0]
    ratios = {}
    for m in modes[1:]:
        ratios[m] = (later[m] / later[base], later_train[m] / later_train[base])
        print(
            f"epochs after the first: {base} {later[base]:.2f} s, {m} {later[m]:.2f} s -> {ratios[m][0]:.1f}x "
            f"(training part only, without validation: {ratios[m][1]:.1f}x)"
        )
    print(json.dumps({"args": vars(args), "results": results, "ratios_vs_" + base: ratios}))


if __name__ == "__main__":
    main()
