"""`run_demo(config)`, `dinoseg demo [OUTPUT]` / `python -m jobs.demo`: the whole pipeline offline, on the CPU, in a
few minutes: synthetic labeled set -> head trained by Ray Train (2 workers) on a randomly
initialised backbone -> held-out images segmented by Ray Data -> evaluation and overlays.

No pretrained weights are used (none can be downloaded offline), and the demo says so: the
mIoU it prints shows the pipeline working end to end, not what DINOv2 features reach.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.options import address_option, argument, option

RANDOM_BACKBONE_NOTE = (
    "The backbone is randomly initialised: offline there are no pretrained DINOv2 weights, so this mIoU shows "
    "the pipeline working end to end, not DINOv2's quality (run `dinoseg segment` with a named model for that)."
)


@dataclass
class DemoConfig:
    output: str = argument("Folder for the demo's data, head, masks and overlays.", cli_default="dinoseg-demo")
    workers: int = option(2, "Ray Train workers.")
    epochs: int = option(8, "Training epochs.")
    address: Optional[str] = address_option()


def run_demo(config: DemoConfig, echo=print) -> dict:
    """Run the demo into config.output (started over if it exists); returns the evaluation."""
    from pipeline import runtime
    from pipeline.data.synthetic import write_synthetic
    from pipeline.evaluate import EvaluateConfig
    from pipeline.evaluate import run_evaluate as evaluate
    from pipeline.io.files import absolute_output
    from pipeline.segment import SegmentConfig, summary_table
    from pipeline.segment import run_segment as segment
    from pipeline.train import TrainConfig
    from pipeline.train import run_train as train

    out = absolute_output(config.output).rstrip("/")
    data, run_dir, seg = f"{out}/data", f"{out}/run", f"{out}/segment"
    echo(f"dinoseg demo -> {out}\n{RANDOM_BACKBONE_NOTE}\n")
    echo("1/4 synthetic labeled set (coloured shapes): 48 training, 16 held-out images")
    write_synthetic(data, train=48, val=16, size=112, seed=0)
    started = runtime.start_ray(config.address)  # one Ray for the three jobs
    try:
        echo(f"2/4 training a linear head, Ray Train, {config.workers} workers, {config.epochs} epochs")
        trained = train(
            TrainConfig(
                f"{data}/train/images",
                f"{data}/train/masks",
                f"{data}/classes.yaml",
                run_dir,
                val_images=f"{data}/val/images",
                val_masks=f"{data}/val/masks",
                backbone_weights="random",
                resolution=112,
                crop=112,
                epochs=config.epochs,
                batch_size=8,
                lr=0.03,
                workers=config.workers,
                overwrite=True,
                address=config.address,
            )
        )
        echo("3/4 segmenting the held-out images with that head (Ray Data), with overlays")
        counts = segment(
            SegmentConfig(
                f"{data}/val/images",
                seg,
                model=None,
                head=f"{run_dir}/head.pt",
                backbone_weights="random",
                overlays=True,
                overwrite=True,
                address=config.address,
            )
        )
        echo(summary_table(counts))
    finally:
        if started:
            runtime.stop_ray()
    echo("4/4 evaluating the masks against the held-out ground truth")
    result = evaluate(
        EvaluateConfig(f"{seg}/masks", f"{data}/val/masks", f"{data}/classes.yaml", output=f"{out}/evaluation.json")
    )
    echo(
        f"\nmIoU on the {counts['predicted']} held-out images: {result['miou']:.3f} (guessing scores about 0.2); "
        f"the best validation mIoU during training was {trained['best']['miou']:.3f}."
    )
    echo(RANDOM_BACKBONE_NOTE)
    echo(
        f"\nWhere to look:\n  {seg}/overlays/   the images with their predicted masks\n"
        f"  {seg}/masks/      the masks (palette PNG, value = class id)\n"
        f"  {out}/evaluation.json   per-class IoU, pixel accuracy, Dice\n"
        f"  {run_dir}/metrics.jsonl  loss and validation mIoU per epoch; {run_dir}/head.pt the head"
    )
    return {"evaluation": result, "train": trained, "segment": counts, "output": out}
