"""Heads that need no training, against a trained one, on the synthetic set (random ViT-S/14):

- prototype heads from the first 8 labeled training images (k=1 and k=4), from their full masks
  and from 5 clicks per class per image (`synthetic --points`), scored on the validation images;
- a linear head trained (Ray Train, feature cache) on the same 8 images, and on all of them;
- discovery over the training images with K = the number of classes: the clusters' best
  one-to-one match with the true classes (Hungarian matching on IoU) gives a validation mIoU;
- prototype-head build time and discover time for --timing-images images (per 1,000 below).

    .venv/bin/python benchmarks/bench_prototypes.py [--train 48] [--val 16] [--few 8]
        [--timing-images 1000] [--resolution 112] [--timing-only --timing-size 448]

Prints a table and a JSON line. One Ray for every run; each mIoU is `evaluate`'s.
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

SMALL = {"backbone_weights": "random"}


def few_manifest(root: Path, syn: dict, n: int) -> tuple[str, str]:
    """An image,mask manifest of the first n training pairs, and a point file of their clicks."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    images = sorted(Path(syn["images"]["train"]).glob("*.png"))[:n]
    masks = [Path(syn["masks"]["train"]) / p.name for p in images]
    manifest = root / "few.csv"
    pacsv.write_csv(pa.table({"image": [str(p) for p in images], "mask": [str(m) for m in masks]}), manifest)
    names = {p.name for p in images}
    points = Path(syn["points"]).read_text().splitlines()
    clicks = root / "few-points.csv"
    clicks.write_text("\n".join([points[0]] + [line for line in points[1:] if line.split(",")[0] in names]) + "\n")
    return str(manifest), str(clicks)


def scored(head: str, images: str, gt: str, classes: str, out: Path) -> float:
    from pipeline.evaluate import EvaluateConfig, run_evaluate
    from pipeline.segment import SegmentConfig, run_segment

    run_segment(SegmentConfig(images, str(out), model=None, head=head, **SMALL))
    return run_evaluate(EvaluateConfig(str(out / "masks"), gt, classes))["miou"]


def hungarian_miou(pred_folder: Path, gt_folder: str, num_classes: int, clusters: int) -> float:
    """mIoU of the best one-to-one assignment of clusters to classes (IoU-maximising)."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from pipeline.data.metrics import confusion_matrix
    from pipeline.io.masks import decode_mask_png

    n = max(num_classes, clusters)
    cm = np.zeros((n, n), np.int64)
    for gt in sorted(Path(gt_folder).glob("*.png")):
        pred = decode_mask_png((pred_folder / gt.name).read_bytes())
        cm += confusion_matrix(pred, decode_mask_png(gt.read_bytes()), n)
    cm = cm[:num_classes, :clusters]  # rows: true classes, columns: clusters
    iou = cm / np.maximum(cm.sum(1, keepdims=True) + cm.sum(0, keepdims=True) - cm, 1)
    rows, cols = linear_sum_assignment(-iou)
    matched = np.zeros(num_classes)
    matched[rows] = iou[rows, cols]
    return float(matched.mean())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=48)
    ap.add_argument("--val", type=int, default=16)
    ap.add_argument("--few", type=int, default=8)
    ap.add_argument("--resolution", type=int, default=112)
    ap.add_argument("--timing-images", type=int, default=1000)
    ap.add_argument("--timing-size", type=int, default=112, help="short side of the timing images")
    ap.add_argument("--timing-only", action="store_true", help="skip the mIoU comparisons")
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args()

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="bench-proto-"))
    ray.init(include_dashboard=False, log_to_driver=False)
    results: dict = {"machine": f"{cpu_model()}, {core_count()} cores", "resolution": args.resolution}
    try:
        if not args.timing_only:
            quality(args, tmp, results)
        timing(args, tmp, results)
    finally:
        ray.shutdown()
    width = max(len(k) for k in results)
    for name, r in results.items():
        if isinstance(r, dict) and "val_miou" in r:
            print(f"{name:<{width}}  val mIoU {r['val_miou']:.4f}")
    for name, v in results["timing"].items():
        print(f"{name:<{width}}  {v}")
    print(json.dumps(results))


def quality(args, tmp: Path, results: dict) -> None:
    """Validation mIoU of prototype heads (masks, points; k=1, 4), linear heads, discovery."""
    from pipeline.data.synthetic import SYNTHETIC_CLASSES, write_synthetic
    from pipeline.label.discover import DiscoverConfig, run_discover
    from pipeline.label.prototypes import PrototypeConfig, run_prototypes
    from pipeline.segment import SegmentConfig, run_segment
    from pipeline.train import TrainConfig, run_train

    syn = write_synthetic(str(tmp / "syn"), train=args.train, val=args.val, size=112, seed=0, points=5)
    classes, val_images, val_masks = syn["classes"], syn["images"]["val"], syn["masks"]["val"]
    manifest, clicks = few_manifest(tmp, syn, args.few)
    common = {"classes": classes, "resolution": args.resolution, **SMALL}
    for name, images, masks, k in (
        ("prototypes k=1, masks", manifest, None, 1),
        ("prototypes k=4, masks", manifest, None, 4),
        ("prototypes k=1, points", syn["images"]["train"], clicks, 1),
        ("prototypes k=4, points", syn["images"]["train"], clicks, 4),
    ):
        out = tmp / name.replace(" ", "").replace(",", "-").replace("=", "")
        started = time.perf_counter()
        run_prototypes(PrototypeConfig(images, masks, output=str(out / "head.pt"), prototypes=k, **common))
        seconds = time.perf_counter() - started
        results[name] = {
            "val_miou": scored(str(out / "head.pt"), val_images, val_masks, classes, out / "seg"),
            "build_seconds": round(seconds, 2),
        }
    train_opts = {"resolution": args.resolution, "crop": args.resolution, "lr": 0.03, "batch_size": 8, **SMALL}
    for name, images, masks in (
        (f"linear head trained on the {args.few}", manifest, None),
        (f"linear head trained on all {args.train}", syn["images"]["train"], syn["masks"]["train"]),
    ):
        out = tmp / name.replace(" ", "-")
        started = time.perf_counter()
        info = run_train(
            TrainConfig(
                images,
                masks,
                classes=classes,
                output=str(out),
                val_images=val_images,
                val_masks=val_masks,
                epochs=args.epochs,
                **train_opts,
            )
        )
        results[name] = {
            "val_miou": scored(info["head"], val_images, val_masks, classes, out / "seg"),
            "train_seconds": round(time.perf_counter() - started, 2),
            "epochs": args.epochs,
        }
    k = len(SYNTHETIC_CLASSES)
    out = tmp / "discover"
    run_discover(DiscoverConfig(syn["images"]["train"], str(out), clusters=k, resolution=args.resolution, **SMALL))
    run_segment(SegmentConfig(val_images, str(out / "seg"), model=None, head=str(out / "head.pt"), **SMALL))
    results[f"discover K={k}, Hungarian-matched"] = {"val_miou": hungarian_miou(out / "seg" / "masks", val_masks, k, k)}


def timing(args, tmp: Path, results: dict) -> None:
    """Prototype-head build (features computed, then cached) and discover over many images."""
    from pipeline.data.synthetic import write_synthetic
    from pipeline.label.discover import DiscoverConfig, run_discover
    from pipeline.label.prototypes import PrototypeConfig, run_prototypes

    n = args.timing_images
    many = write_synthetic(str(tmp / "many"), train=n, val=0, size=args.timing_size, seed=3)
    head = str(tmp / "many-head" / "head.pt")
    common = {"classes": many["classes"], "resolution": args.resolution, **SMALL}
    seconds = {}
    for label in ("prototypes, features computed", "prototypes, features cached"):
        started = time.perf_counter()
        run_prototypes(
            PrototypeConfig(many["images"]["train"], many["masks"]["train"], output=head, overwrite=True, **common)
        )
        seconds[label] = time.perf_counter() - started
    started = time.perf_counter()
    run_discover(
        DiscoverConfig(
            many["images"]["train"], str(tmp / "many-discover"), clusters=8, resolution=args.resolution, **SMALL
        )
    )
    seconds["discover"] = time.perf_counter() - started
    results["timing"] = {"images": n, "image size": args.timing_size} | {
        f"{k} (s per 1,000 images)": round(v * 1000 / n, 1) for k, v in seconds.items()
    }


if __name__ == "__main__":
    main()
