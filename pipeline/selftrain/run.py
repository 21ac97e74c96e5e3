"""`run_self_train(config)`: `dinoseg self-train IMAGES MASKS --unlabeled U --classes F --output OUT`.

Round 0 trains a head on the labeled pairs. Each later round pseudo-labels the unlabeled images
with the best head so far, trains a new head on labeled + pseudo-labeled pairs, and scores it
on the same validation set (the training job's validation mIoU). It stops when a round does
not improve on the best, or after --rounds rounds; OUT/head.pt is the best head.

With --start-head H (a prototype head, or any head that needs no labels), round 0 is H itself:
nothing is trained, IMAGES/MASKS are optional, and every round is scored the same way, by
segmenting the validation images (OUT/round-<r>/val/) and comparing with their masks. Without
any validation set every round runs and the last one is kept.

Layout: OUT/round-<r>/{pseudo/ (a pseudo-label run), pairs.csv (what round r trains on),
train/ (a train run)}, OUT/cache/ (features, shared by every round), OUT/val.csv and
OUT/labeled.csv (when the validation set is split off the labeled pairs), OUT/rounds.jsonl,
OUT/self_train.json, OUT/head.pt. Every step resumes, so re-running the command continues.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from model.errors import DinosegError
from model.storage import options_for
from pipeline.io.records import jsonl, read_json, write_json, write_text
from pipeline.label import PseudoLabelConfig
from pipeline.options import REQUIRED, option
from pipeline.segment import SegmentConfig
from pipeline.selftrain.score import check_start_head, pseudo_label, score
from pipeline.train import TrainConfig, run_train

log = logging.getLogger("dinoseg.self_train")


@dataclass
class SelfTrainConfig:
    train: TrainConfig  # round 0's run; later rounds change images/masks/output
    unlabeled: str = option(REQUIRED, "Folder/URL prefix, glob or manifest of the images to pseudo-label.")
    rounds: int = option(3, "Pseudo-label + retrain rounds after round 0 (stops early when one does not improve).")
    start_head: Optional[str] = option(
        None, "Round 0 is this head (a prototype head, say) instead of one trained: IMAGES/MASKS become optional."
    )
    rule: PseudoLabelConfig | None = None  # threshold, class_balanced, min_coverage of the pseudo-label passes
    scale: dict = field(default_factory=dict)  # actors, cpus_per_actor, decode_cpus of the pseudo-label pass


def run_self_train(config: SelfTrainConfig) -> dict:
    """All rounds; returns OUT/self_train.json's content."""
    from model.storage import scope_config
    from pipeline import runtime
    from pipeline.data.pairs import Pairs, list_pairs, split_pairs
    from pipeline.io.files import absolute_input, absolute_output

    config = scope_config(config)  # plain storage options for the URLs it names, as on a command line

    if config.rounds < 0:
        raise DinosegError(f"--rounds {config.rounds} must be 0 or more.")
    base = config.train
    so = base.storage_options or None
    out = absolute_output(base.output).rstrip("/")
    # a bad rule fails before round 0
    rule = (config.rule or PseudoLabelConfig(SegmentConfig("", ""))).validate()
    start = absolute_input(config.start_head)
    if not start and not base.images:
        raise DinosegError("give the labeled IMAGES and MASKS, or --start-head with a head to start from.")
    from model.classes import load_class_map

    # MASKS and the rounds' pseudo-labels train together: both must be in dinoseg's values
    load_class_map(base.classes, so).require_own_values(base.classes, "self-train mixes its masks with")
    if start:
        check_start_head(start, base)  # a missing file or other classes fail before any work
    started_ray = runtime.start_ray(base.address)
    rounds: list[dict] = []
    try:
        labeled = _labeled(base, out) if base.images else Pairs()
        if labeled.problems:
            log.warning(
                "%d labeled keys have a problem (e.g. %s) and are left out",
                len(labeled.problems),
                labeled.problems[0]["message"],
            )
        if base.val_images:
            val_images, val_masks = base.val_images, base.val_masks
        elif start and not len(labeled):
            val_images = val_masks = None
            log.warning("no validation set: every round runs and the last one is kept (give --val-images/--val-masks)")
        else:  # split once, so every round scores on the same images and no pseudo-label lands in validation
            labeled, val = split_pairs(labeled, base.val_fraction, base.seed)
            if not len(val):
                raise DinosegError(
                    "self-training needs a validation set: pass --val-images/--val-masks or a larger --val-fraction."
                )
            val_images, val_masks = _manifest(f"{out}/val.csv", [val], so), None
            _manifest(f"{out}/labeled.csv", [labeled], so)  # for the record: what round 0 trains on
        val = _validation(base, val_images, val_masks, out) if val_images else None
        val_set = set(val.images) if val else set()
        base = replace(
            base,
            val_images=val_images,
            val_masks=val_masks,
            val_fraction=base.val_fraction if val_images else 0.0,
            cache_dir=base.cache_dir or f"{out}/cache",
            resume=True,
        )
        best = None
        for r in range(config.rounds + 1):
            started = time.time()
            folder = f"{out}/round-{r}"
            record: dict = {"round": r, "labeled_pairs": len(labeled), "pseudo_pairs": 0}
            if start and r == 0:  # the start head is round 0: scored, not trained
                miou = score(config, start, val, folder, base) if val else None
                if val and miou is None:
                    raise DinosegError(
                        f"round 0: no validation image could be segmented and compared (see {folder}/val/errors): "
                        "fix the validation set."
                    )
                best = record | {
                    "head": start,
                    "val_miou": miou,
                    "best": True,
                    "seconds": round(time.time() - started, 1),
                }
                rounds.append(best)
                write_text(f"{out}/rounds.jsonl", jsonl(rounds), so)
                continue
            sources = [labeled]
            if r > 0:
                pseudo = pseudo_label(config, rule, best["head"], f"{folder}/pseudo", base)
                pairs = list_pairs(pseudo["pairs_csv"], None, so)
                scored = [i for i, image in enumerate(pairs.images) if image in val_set]
                if scored:  # an image that is also scored on must not train on its own pseudo-label
                    log.warning(
                        "%d unlabeled images are validation images too: left out of round %d's pairs", len(scored), r
                    )
                    pairs = pairs.subset(sorted(set(range(len(pairs))) - set(scored)))
                sources.append(pairs)
                record.update(
                    pseudo_head=pseudo["head_checksum"],
                    pseudo_pairs=len(pairs),
                    rule=pseudo["rule"],
                    thresholds=pseudo["thresholds"],
                    mean_coverage=pseudo["mean_coverage"],
                    below_coverage=pseudo["counts"]["below_coverage"],
                )
            if not sum(len(p) for p in sources):
                raise DinosegError(
                    f"round {r} has no pairs to train on: no labeled pairs, and no pseudo-label passed the rule "
                    f"(see {folder}/pseudo/labels): lower --threshold or --min-coverage."
                )
            manifest, digest = _manifest(f"{folder}/pairs.csv", sources, so, digest=True)
            # a round re-run on other pairs (new labels, rule or images, or pseudo-labels of a retrained
            # earlier round) trains again from scratch; on the same inputs it resumes, or returns the
            # finished run. The inputs are recorded before training, so a kill cannot hide a change.
            inputs = {"pairs_sha256": digest, "pseudo_head": record.get("pseudo_head")}
            changed = read_json(f"{folder}/inputs.json", so) != inputs
            if changed:
                write_json(f"{folder}/inputs.json", inputs, so, indent=None)
            run_config = replace(
                base, images=manifest, masks=None, output=f"{folder}/train", resume=not changed, overwrite=changed
            )
            try:
                info = run_train(run_config)
            except DinosegError as e:
                raise DinosegError(
                    f"round {r}: {e} (self-train resumes its rounds; to change such an option, give a new --output)"
                ) from None
            if start:  # scored like the start head was, not by the training job's own validation
                miou = score(config, info["head"], val, folder, base) if val else None
            else:
                miou = (info.get("best") or {}).get("miou")
            record.update(val_miou=miou, head=info["head"], seconds=round(time.time() - started, 1))
            if start and val is None:  # nothing to score on: the latest round is the best
                improved = True
            else:
                improved = miou is not None and (best is None or best["val_miou"] is None or miou > best["val_miou"])
            record["best"] = improved
            rounds.append(record)
            if improved:
                best = record
            if best is None:
                raise DinosegError(
                    "round 0 produced no validation mIoU: check the validation set (see round-0/train/problems.jsonl)."
                )
            write_text(f"{out}/rounds.jsonl", jsonl(rounds), so)
            if r > 0 and not improved:
                log.info(
                    "round %d did not improve validation mIoU (%.4f <= %.4f): stopping", r, miou or 0, best["val_miou"]
                )
                break
    finally:
        if started_ray:
            runtime.stop_ray()
    if best is None:
        raise DinosegError(
            "no round produced a validation mIoU: check the validation set (see round-0/train/problems.jsonl)."
        )
    result = {
        "rounds": rounds,
        "best_round": best["round"],
        "best_val_miou": best["val_miou"],
        "scored": (
            "none: no validation set"
            if val is None
            else "segment + compare with the validation masks"
            if start
            else "the training job's validation"
        ),
        "head": f"{out}/head.pt",
    }
    _copy(best["head"], result["head"], so)
    write_json(f"{out}/self_train.json", result, so)
    return result


def _labeled(base, out: str):
    """The labeled pairs; a point file as MASKS is drawn as sparse masks under OUT/point-masks."""
    from model.classes import load_class_map
    from pipeline.data.points import labeled_pairs

    so = base.storage_options or None
    classes = load_class_map(base.classes, so)
    return labeled_pairs(base.images, base.masks, classes, f"{out}/point-masks", so, base.max_megapixels)


def _validation(base, images: str, masks: str | None, out: str):
    """The validation pairs; a point file as masks is drawn under OUT/val-point-masks."""
    from model.classes import load_class_map
    from pipeline.data.points import labeled_pairs

    so = base.storage_options or None
    classes = load_class_map(base.classes, so)
    return labeled_pairs(images, masks, classes, f"{out}/val-point-masks", so, base.max_megapixels, what="validation")


def _manifest(url: str, sources, so, digest: bool = False):
    """Write an image,mask CSV of the pairs (absolute URLs) and return its URL (and, with
    `digest`, the SHA-256 of what was written)."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from pipeline.io.files import write_bytes_atomic

    images, masks = [], []
    for pairs in sources:
        images += pairs.images
        masks += pairs.masks
    buf = pa.BufferOutputStream()
    pacsv.write_csv(pa.table({"image": pa.array(images, pa.string()), "mask": pa.array(masks, pa.string())}), buf)
    data = buf.getvalue().to_pybytes()
    write_bytes_atomic(url, data, so)
    return (url, hashlib.sha256(data).hexdigest()) if digest else url


def _copy(src: str, dst: str, so) -> None:
    import fsspec

    from pipeline.io.files import write_bytes_atomic

    with fsspec.open(src, "rb", **options_for(src, so)) as f:
        write_bytes_atomic(dst, f.read(), so)


def rounds_table(result: dict) -> str:
    """The per-round table: pairs, the rule's thresholds, coverage, validation mIoU."""
    lines = [f"{'round':>5}  {'labeled':>7}  {'pseudo':>6}  {'coverage':>8}  {'thresholds':<28}  {'val mIoU':>8}"]
    for r in result["rounds"]:
        th = r.get("thresholds") or {}
        values = [v for v in th.values() if v is not None]
        shown = "-" if not th else (f"{min(values):.3f}..{max(values):.3f}" if values else "none")
        cov = "-" if r.get("mean_coverage") is None else f"{r['mean_coverage']:.1%}"
        miou = "-" if r["val_miou"] is None else f"{r['val_miou']:.4f}"
        lines.append(
            f"{r['round']:>5}  {r['labeled_pairs']:>7,}  {r['pseudo_pairs']:>6,}  {cov:>8}  {shown:<28}  {miou:>8}"
            + ("  *" if r["best"] else "")
        )
    miou = result["best_val_miou"]
    scored = "no validation set: the last round" if miou is None else f"val mIoU {miou:.4f}"
    lines.append(f"best: round {result['best_round']} ({scored}); head: {result['head']}")
    return "\n".join(lines)
