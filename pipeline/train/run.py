"""`run_train(config)`: the train workflow (`dinoseg train`, `python -m jobs.train`).

Lists and splits the pairs, checks them (and fills the feature cache) in one Ray Data pass
(`pipeline.features.check`), then hands the head's training to Ray Train (`pipeline.train.data`,
`pipeline.train.loop`) and writes train.json. Re-running with resume=True continues from OUTPUT/last.pt.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, replace

from model.errors import DinosegError
from model.storage import options_for
from pipeline.io.records import versions
from pipeline.train.config import PLANNED, RESUME_KEYS, Plan, TrainConfig

log = logging.getLogger("dinoseg.train")


def _check(config: TrainConfig) -> None:
    bad = [
        (config.epochs is None or config.epochs >= 1, f"--epochs {config.epochs} must be at least 1"),
        (config.steps is None or config.steps >= 1, f"--steps {config.steps} must be at least 1"),
        (
            config.epochs is None or config.steps is None,
            f"--epochs {config.epochs} and --steps {config.steps} both set the run's length; pass one",
        ),
        (config.batch_size >= 1, f"--batch-size {config.batch_size} must be at least 1"),
        (config.lr is None or config.lr > 0, f"--lr {config.lr} must be positive"),
        (config.weight_decay >= 0, f"--weight-decay {config.weight_decay} must not be negative"),
        (0 <= config.warmup < 1, f"--warmup {config.warmup} must be a fraction in [0, 1)"),
        (config.resolution >= 14 and config.crop >= 14, "--resolution and --crop must be at least 14 pixels"),
        (config.workers is None or config.workers >= 1, f"--workers {config.workers} must be at least 1"),
        (not (config.resume and config.overwrite), "--resume and --overwrite contradict each other; pass one"),
    ]
    for ok, message in bad:
        if not ok:
            raise DinosegError(message + ".")
    if (config.val_images is None) != (config.val_masks is None) and config.masks is not None:
        raise DinosegError("give --val-images and --val-masks together (or neither, to split off --val-fraction).")


def _layers(config: TrainConfig, depth: int) -> tuple[int, ...]:
    from model.heads import default_layers
    from pipeline.features.config import parse_layers

    return parse_layers(config.layers, depth, default_layers(config.head, depth))


def _class_weights(config: TrainConfig, n: int) -> tuple[float, ...] | None:
    if not config.class_weights:
        return None
    try:
        weights = tuple(float(v) for v in config.class_weights.split(","))
    except ValueError:
        raise DinosegError(
            f"--class-weights '{config.class_weights}' is not a comma-separated list of numbers."
        ) from None
    if len(weights) != n or any(w < 0 for w in weights):
        raise DinosegError(
            f"--class-weights gives {len(weights)} weights for {n} classes: give one non-negative weight per class."
        )
    return weights


def settings(config: TrainConfig, layers, classes) -> dict:
    """The options that define the run, as plain values (stored in last.pt and train.json)."""
    s = asdict(config) | {
        "layers": list(layers),
        "class_names": list(classes.names),
        "ignore_index": classes.ignore_index,
    }
    s["storage_options"] = sorted(config.storage_options)  # names only: no secrets in files
    return json.loads(json.dumps(s))


def run_train(config: TrainConfig) -> dict:
    """Train a head on config's pairs; returns what OUTPUT/train.json holds. With resume=True it
    continues the run in OUTPUT from last.pt."""
    from model.backbone import backbone_config
    from model.classes import load_class_map, save_class_map
    from model.geometry import IMAGENET_MEAN, IMAGENET_STD
    from model.heads import HeadConfig
    from model.storage import scope_config
    from pipeline import runtime
    from pipeline.data.pairs import split_pairs
    from pipeline.data.points import labeled_pairs
    from pipeline.io.files import absolute_input, absolute_output
    from pipeline.io.records import write_text
    from pipeline.runtime.train import fit, refusals
    from pipeline.train.config import LoopConfig, plan
    from pipeline.train.data import DataSpec, refuse_unread_pairs, training_datasets
    from pipeline.train.loop import read_state, train_loop
    from pipeline.train.progress import EpochLines
    from pipeline.train.training import Schedule

    config = scope_config(config)  # plain storage options for the URLs it names, as on a command line

    started = time.time()
    _check(config)
    # local paths as absolute ones: Ray's workers (a joined cluster's, or a Ray started in another
    # folder) do not run in this process's folder
    config = replace(
        config,
        output=absolute_output(config.output),
        backbone_weights=absolute_input(config.backbone_weights),
        cache_dir=absolute_output(config.cache_dir) if config.cache_dir else None,
    )
    so = config.storage_options or None
    out = config.output.rstrip("/")
    classes = load_class_map(config.classes, so)
    if len(classes) > 255:  # labels are 8-bit in training (255 = ignore); fail here, not per pair
        raise DinosegError(
            f"{config.classes} has {len(classes)} classes; training supports at most 255: merge classes or split the map."
        )
    bb = backbone_config(config.backbone)
    layers = _layers(config, bb.depth)
    weights = _class_weights(config, len(classes))
    head = HeadConfig(config.head, layers, bb.embed_dim, len(classes))
    run_settings = settings(config, layers, classes) | {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    run_id, state = _run_id(config, out, so, run_settings, read_state)

    # the backbone loads on the driver first: a wrong name or weights file fails here, in one sentence
    from model.hub import load_backbone
    from model.weights import weights_env

    load_backbone(config.backbone, config.backbone_weights, so)

    # a point file as MASKS: its clicks are drawn as sparse masks (255 elsewhere) under OUTPUT
    pairs = labeled_pairs(config.images, config.masks, classes, f"{out}/point-masks", so, config.max_megapixels)
    if config.val_images:
        val = labeled_pairs(
            config.val_images,
            config.val_masks,
            classes,
            f"{out}/val-point-masks",
            so,
            config.max_megapixels,
            what="validation",
        )
        train = pairs
        problems = pairs.problems + val.problems
    else:
        train, val = split_pairs(pairs, config.val_fraction, config.seed)
        problems = list(pairs.problems)
    # the head's outputs are 0-based with 255 = ignore, whatever values the masks gave
    save_class_map(classes.internal(), f"{out}/classes.yaml", so)

    started_ray = runtime.start_ray(config.address)
    try:
        cluster = runtime.cluster_resources(joined=not started_ray)
        train, val, bad, cache_folder = _check_pass(config, train, val, classes, layers, so, cluster)
        refuse_unread_pairs(bad)  # the storage failing is not a bad pair: fail, never train on less
        problems += bad
        counts = {"train_pairs": len(train), "val_pairs": len(val), "problems": len(problems)}
        _report_problems(problems, out, so)
        if not len(train):
            raise DinosegError(
                f"no usable training pairs are left ({len(problems)} problems, see {out}/problems.jsonl): fix the data and re-run."
            )
        # GPU workers an autoscaler has not started yet count: Ray Train asks for them
        use_gpu = bool(cluster.get("GPU", 0) or cluster.get(runtime.GPU_CEILING, 0))
        workers = config.workers or max(1, int(cluster.get("GPU", 0)))
        if len(train) < workers:
            raise DinosegError(f"{len(train)} training pairs for {workers} workers: use fewer --workers or more data.")
        per_worker = max(1, config.batch_size // workers)
        budget = plan(len(train), workers, per_worker, config.epochs, config.steps, config.lr)
        _check_plan(state, budget, out)
        log.info(
            "training %d steps (%d epochs of %d) at lr %.3g",
            budget.steps,
            budget.epochs,
            budget.steps_per_epoch,
            budget.lr,
        )
        if state is not None and state["epoch"] >= budget.epochs:
            log.info("the run in %s finished all %d epochs already", out, budget.epochs)
        cpus = config.cpus_per_worker or (
            1.0 if use_gpu else max(0.25, min(1.0, (cluster.get("CPU", 1) - 1) / workers))
        )
        loop = LoopConfig(
            out,
            run_id,
            head.to_dict(),
            classes.internal().to_dict(),
            config.backbone,
            config.backbone_weights,
            config.resolution,
            config.cache,
            budget.epochs,
            per_worker,
            budget.steps_per_epoch,
            Schedule(budget.lr, config.weight_decay, config.warmup, config.schedule),
            weights,
            config.precision,
            config.seed,
            run_settings | {"val_pairs": len(val), "plan": asdict(budget)},
            so,
            steps=budget.steps,
            weights_env=weights_env(),
        )
        spec = DataSpec(
            train,
            val,
            len(classes),
            config.resolution,
            config.crop,
            cache_folder,
            so,
            max_megapixels=config.max_megapixels,
            ignore_index=classes.ignore_index,
            first_id=classes.first_id,
        )
        if state is None or state["epoch"] < budget.epochs:
            # a pair the storage stops giving mid-run (refuse_unread) ends the run in its sentence
            with refusals(), EpochLines(f"{out}/metrics.jsonl", so):
                fit(train_loop, loop, f"dinoseg-train-{run_id}", training_datasets(spec), workers, use_gpu, cpus)
    finally:
        if started_ray:
            runtime.stop_ray()
    final = read_state(out, so)
    info = {
        "run_id": run_id,
        "arguments": run_settings,
        "versions": versions(),
        "counts": counts,
        "workers": workers,
        "plan": asdict(budget),
        "epochs_done": final["epoch"] if final else 0,
        "best": final["best"] if final else None,
        "history": final["history"] if final else [],
        "wall_seconds": round(time.time() - started, 3),
        "head": f"{out}/head.pt",
    }
    write_text(f"{out}/train.json", json.dumps(info, indent=2, default=str) + "\n", so)
    return info


def _run_id(config: TrainConfig, out: str, so, run_settings: dict, read_state) -> tuple[str, dict | None]:
    """A fresh id, or the id of the run in OUTPUT that --resume continues (its options must match)."""
    state = read_state(out, so)
    if state is None:
        if config.resume:
            log.warning("nothing to resume in %s (no last.pt): starting a new run", out)
        return uuid.uuid4().hex[:12], None
    if config.overwrite:
        import fsspec

        fs, path = fsspec.core.url_to_fs(f"{out}/last.pt", **options_for(f"{out}/last.pt", so))
        fs.rm(path)  # a crash before the new run's first epoch must not resume the old one
        return uuid.uuid4().hex[:12], None
    if not config.resume:
        raise DinosegError(
            f"{out} already holds a training run (last.pt after epoch {state['epoch']}): pass --resume to continue it, "
            "--overwrite to start over, or another --output."
        )
    before = state.get("settings", {})
    planned = before.get("plan") or {}
    for key in RESUME_KEYS:
        now = run_settings.get(key)
        if key in PLANNED:
            if now is None:
                continue  # follows from the set's size: _check_plan compares it once the set is counted
            was = planned.get(key, before.get(key))
            if was is None:
                continue
        elif key in before:
            was = before[key]
        else:
            continue
        if was != now:
            flag = "--" + key.replace("_", "-")
            raise DinosegError(
                f"{out}/last.pt was trained with {flag} {was!r}, not {now!r}: "
                f"resume with the same options, or pass --overwrite to start over."
            )
    return state["run_id"], state


def _check_plan(state: dict | None, budget: Plan, out: str) -> None:
    """A resumed run keeps its steps and lr: defaults derived from a set that has grown since differ."""
    if state is None:
        return
    before = state.get("settings", {})
    planned = before.get("plan") or {"epochs": before.get("epochs"), "lr": before.get("lr")}  # older states
    keys = ("steps", "lr") if "steps" in planned else ("epochs", "lr")
    for key in keys:
        if planned.get(key) is not None and planned[key] != getattr(budget, key):
            raise DinosegError(
                f"{out}/last.pt was trained with --{key} {planned[key]!r}, and these options on this training set "
                f"give {getattr(budget, key)!r}: resume with --{key} {planned[key]!r}, or pass --overwrite to start over."
            )


def _check_pass(config, train, val, classes, layers, so, cluster):
    """Read and check every pair once (and fill the feature cache); bad pairs become problems."""
    from pipeline import runtime
    from pipeline.data.pairs import Pairs
    from pipeline.features.cache import feature_config
    from pipeline.features.check import check_pairs
    from pipeline.features.pairs import PairConfig

    everything = Pairs(train.keys + val.keys, train.images + val.images, train.masks + val.masks)
    features = folder = None
    if config.cache:
        features = feature_config(
            config.backbone, layers, config.resolution, config.backbone_weights, config.precision, so
        )
        folder = features.folder(config.cache_dir or f"{config.output.rstrip('/')}/cache")
    pair = PairConfig.of(
        classes,
        config.resolution if config.cache else None,
        max_megapixels=config.max_megapixels,
        keep=config.cache,
    )
    resources = runtime.Resources(decode_cpus=0.25).resolve(cluster)
    good, problems = check_pairs(everything, pair, so, resources, features, folder)
    keep = lambda p: p.subset([i for i, url in enumerate(p.images) if url in good])  # noqa: E731
    return keep(train), keep(val), problems, folder


def _report_problems(problems: list[dict], out: str, so) -> None:
    from pipeline.io.records import jsonl, write_text

    if not problems:
        return
    write_text(f"{out}/problems.jsonl", jsonl(problems), so)
    log.warning("%d pairs left out (all in %s/problems.jsonl), e.g.:", len(problems), out)
    for p in problems[:5]:
        log.warning("  %s: %s", p["key"] or p["image"] or p["mask"], p["message"])


def summary(info: dict) -> str:
    lines = [f"{'epoch':>5}  {'loss':>8}  {'val mIoU':>8}  {'seconds':>8}"]
    for r in info["history"]:
        miou = "-" if r.get("val_miou") is None else f"{r['val_miou']:.4f}"  # no validation pairs: no mIoU
        lines.append(f"{r['epoch']:>5}  {r['train_loss']:>8.4f}  {miou:>8}  {r['seconds']:>8.1f}")
    c = info["counts"]
    best = info["best"] or {}
    lines.append(f"pairs: {c['train_pairs']} train, {c['val_pairs']} validation, {c['problems']} left out")
    if best.get("miou") is not None:
        lines.append(f"best validation mIoU {best['miou']:.4f} at epoch {best['epoch']}")
    lines.append(f"head: {info['head']}")
    return "\n".join(lines)
