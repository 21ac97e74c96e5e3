"""What each Ray Train worker runs: DDP on the head, an epoch at a time, validation mIoU, and
the run's files written by rank 0 (Ray only through
`pipeline.runtime.train.Worker`; `pipeline.train.training` holds the math).

Files under OUTPUT, each written atomically, in this order each epoch so that last.pt (the
commit point) never names a best head that is not there:
    head.pt        the best head by validation mIoU (the last one without validation)
    metrics.jsonl  one line an epoch
    last.pt        head, optimizer, scheduler, epoch, history: what --resume continues from

A worker group that Ray restarts (a dead worker) resumes from last.pt too: the state carries the
run id, and a worker adopts a state only of its own run.
"""

from __future__ import annotations

import logging
import time

import torch

from model.checkpoint import HeadCheckpoint
from model.classes import ClassMap
from model.geometry import IMAGENET_MEAN, IMAGENET_STD
from model.heads import HeadConfig, build_head
from model.storage import options_for
from pipeline.data.metrics import scores
from pipeline.io.records import jsonl, write_text
from pipeline.train.config import LoopConfig
from pipeline.train.training import (
    FeatureSource,
    make_optimizer,
    parse_state,
    state_bytes,
    train_epoch,
    validate,
)

log = logging.getLogger("dinoseg.train")


def read_state(output: str, storage_options: dict | None) -> dict | None:
    """OUTPUT/last.pt, or None when there is none."""
    import fsspec

    url = f"{output.rstrip('/')}/last.pt"
    fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
    if not fs.exists(path):
        return None
    from model.weights import load_checkpoint

    return parse_state(load_checkpoint(url, storage_options), url)


def train_loop(config: dict) -> None:
    import torch.distributed as dist

    from pipeline.runtime.train import Worker

    loop: LoopConfig = config["loop"]
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    worker = Worker()
    rank, world, device = worker.rank, worker.world, worker.device
    distributed = dist.is_available() and dist.is_initialized() and world > 1
    torch.manual_seed(loop.seed)

    head_config = HeadConfig.from_dict(loop.head)
    classes = ClassMap.from_dict(loop.classes)
    head = build_head(head_config)
    state = read_state(loop.output, loop.storage_options)
    if state is not None and state.get("run_id") != loop.run_id:
        state = None  # another run's file: the driver decided not to resume it
    if state is not None:
        head.load_state_dict(state["head"]["state_dict"])
    model = worker.prepare_model(head)  # to the device, DDP when world > 1
    total = loop.steps or loop.epochs * loop.steps_per_epoch
    optimizer, scheduler = make_optimizer(model, loop.schedule, max(total, 1))
    history, best, start = [], {"miou": None, "epoch": 0}, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best, start = list(state["history"]), dict(state["best"]), int(state["epoch"])
        if rank == 0:
            log.info("resuming after epoch %d of %d", start, loop.epochs)

    precision = _precision(loop.precision, device)
    source = FeatureSource(head_config.layers, head_config.embed_dim, precision=precision)
    if not loop.cached:
        from model.hub import load_backbone
        from model.weights import use_weights_env

        use_weights_env(loop.weights_env)

        backbone = load_backbone(loop.backbone, loop.backbone_weights, loop.storage_options)
        backbone.requires_grad_(False).eval().to(device)
        source = FeatureSource(
            head_config.layers,
            head_config.embed_dim,
            backbone,
            loop.settings.get("mean"),
            loop.settings.get("std"),
            precision,
        )
    weight = torch.tensor(loop.class_weights, dtype=torch.float32, device=device) if loop.class_weights else None
    train_shard = worker.shard("train")
    val_shard = worker.shard("val") if _has_val(loop) else None
    head_precision = "bf16" if precision == "bf16" else "fp32"  # fp16 would need loss scaling; the head is small

    for epoch in range(start, loop.epochs):
        t0 = time.time()
        batches = train_shard.iter_batches(
            batch_size=loop.batch_size, batch_format="numpy", local_shuffle_buffer_size=max(64, 4 * loop.batch_size)
        )
        # a budget in steps ends within the last epoch
        limit = total - epoch * loop.steps_per_epoch if epoch == loop.epochs - 1 else None
        stats = train_epoch(
            model, source, batches, optimizer, scheduler, device, weight, head_precision, max_steps=limit
        )
        t_train = time.time() - t0
        loss = epoch_loss(stats, device)
        plain = model.module if hasattr(model, "module") else model
        if distributed:
            dist.all_reduce(loss)
            for b in plain.buffers():  # every worker validates (and rank 0 saves) rank 0's BN statistics
                dist.broadcast(b, 0)
        record = {
            "epoch": epoch + 1,
            "epochs": loop.epochs,
            "train_loss": mean_loss(loss),
            "train_samples": int(loss[2]),
            "lr": float(scheduler.get_last_lr()[0]),
        }
        if val_shard is not None:
            conf = validate(
                plain,
                source,
                val_shard.iter_batches(batch_size=loop.batch_size, batch_format="numpy"),
                device,
                head_config.num_classes,
                head_precision,
                take=lambda i: i % world == rank,
            )
            if distributed:
                dist.all_reduce(conf)
            result = scores(conf.cpu().numpy(), list(classes.names))
            record |= {
                "val_miou": result["miou"],
                "val_pixel_accuracy": result["pixel_accuracy"],
                "val_mean_dice": result["mean_dice"],
                "val_iou": result["iou"],
            }
        record["seconds"] = round(time.time() - t0, 3)
        record["train_seconds"] = round(t_train, 3)
        miou = record.get("val_miou")
        improved = val_shard is None or (miou is not None and (best["miou"] is None or miou > best["miou"]))
        if improved:
            best = {"miou": miou, "epoch": epoch + 1}
        history.append(record)
        if rank == 0:
            _save(loop, plain, head_config, classes, optimizer, scheduler, epoch + 1, best, history, improved)
        worker.report({k: v for k, v in record.items() if k != "val_iou"})


def epoch_loss(stats: dict, device) -> torch.Tensor:
    """(loss sum, samples with a loss, samples) of this worker, to all-reduce with SUM: a worker
    with no batches adds zeros, not its NaN mean."""
    return torch.tensor(
        [stats["loss_sum"], stats["loss_samples"], stats["train_samples"]], dtype=torch.float64, device=device
    )


def mean_loss(reduced: torch.Tensor) -> float:
    """The epoch's train loss over every worker; NaN when no batch had a labelled pixel."""
    return float(reduced[0] / reduced[1]) if reduced[1] > 0 else float("nan")


def _has_val(loop: LoopConfig) -> bool:
    return bool(loop.settings.get("val_pairs"))


def _precision(requested: str, device) -> str:
    from model.device import choose_precision

    return choose_precision(requested, device)


def _save(loop: LoopConfig, head, head_config, classes, optimizer, scheduler, epoch, best, history, improved) -> None:
    out, so = loop.output.rstrip("/"), loop.storage_options
    ckpt = HeadCheckpoint(
        backbone=loop.backbone,
        config=head_config,
        classes=classes,
        state_dict={k: v.detach().cpu() for k, v in head.state_dict().items()},
        resolution=loop.resolution,
        mean=tuple(loop.settings.get("mean", IMAGENET_MEAN)),
        std=tuple(loop.settings.get("std", IMAGENET_STD)),
        meta={
            "epoch": epoch,
            "val_miou": history[-1].get("val_miou"),
            "backbone_weights": loop.backbone_weights or "released",
            "run_id": loop.run_id,
        },
    )
    from model.checkpoint import save_head_checkpoint

    if improved:
        save_head_checkpoint(ckpt, f"{out}/head.pt", so)
    write_text(f"{out}/metrics.jsonl", jsonl(history), so)
    state = {
        "run_id": loop.run_id,
        "epoch": epoch,
        "head": ckpt.to_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "best": best,
        "history": history,
        "settings": loop.settings,
    }
    from pipeline.io.files import write_bytes_atomic

    write_bytes_atomic(f"{out}/last.pt", state_bytes(state), so)
