"""What made a mask, so that a resume never mixes masks made otherwise.

The identity is everything that changes a mask: the model, a digest of the head's tensors, a
digest of the backbone's weights file actually loaded, the head's normalisation, and the inference
settings (resolution, mode and, sliding, crop and stride, test-time augmentation, precision as
asked: 'auto' is bf16 on a GPU and fp32 on a CPU, so one command on one cluster resumes).
Batch size, actors, device and the decode limits do not change a mask and do not block a resume.

Every prediction row carries the identity's digest (`identity`), and OUTPUT/identity.json holds
the readable settings, so a refused resume names the option that differs. Rows of an earlier
version have no digest: they are checked against their model and head, and against the options
their run.json recorded; once a run of this version resumed them, identity.json speaks for them.

A backbone file's SHA-256 is `model.weights.verified_sha256`'s: a cached hub file's comes from
its sidecar (a stat), any other local file is hashed once per version and memoised, so a 1.2 GB
ViT-L file is hashed once (about 1-3 s), not per run. A remote weights URL is identified by its
ETag and size when the store gives them.
"""

from __future__ import annotations

import hashlib
import json
import logging

from model.errors import DinosegError
from model.storage import options_for

log = logging.getLogger(__name__)

IDENTITY_NAME = "identity.json"
# the settings, in the order a refusal looks at them, and the option each comes from
OPTIONS = {
    "model": "--model/--head",
    "head": "--head",
    "backbone_weights": "--backbone-weights",
    "normalisation": "--head",
    "resolution": "--resolution",
    "mode": "--mode",
    "crop": "--crop",
    "stride": "--stride",
    "tta": "--tta",
    "precision": "--precision",
    "long_side_ratio": "--resolution",
}


def identity_of(description, backbone_weights: str | None, storage_options: dict | None = None) -> dict:
    """The readable identity of the masks a model makes: `description` is its
    `model.describe.SegmenterDescription` (loaded from `backbone_weights`)."""
    from model.redact import redact_text

    cfg = description.config
    slide = cfg.mode == "slide"
    return {
        "model": redact_text(description.model_id),  # a presigned head URL's signature is no identity, nor kept
        "head": description.head_checksum,
        "backbone_weights": weights_digest(description.backbone, backbone_weights, storage_options),
        # the Segmenter's float32 values, rounded: what every earlier run recorded
        "normalisation": [round(float(v), 6) for v in description.mean] + [round(float(v), 6) for v in description.std],
        "resolution": cfg.resolution,
        "mode": cfg.mode,
        "crop": cfg.crop if slide else None,
        "stride": cfg.stride if slide else None,
        "tta": bool(cfg.flip or tuple(cfg.scales) != (1.0,)),
        "precision": cfg.precision,
        "long_side_ratio": cfg.long_side_ratio,
    }


def digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def weights_digest(backbone: str, weights: str | None, storage_options: dict | None = None) -> str:
    """'random', 'sha256:<hex>' of the file loaded, or 'etag:<etag>:<size>' of a remote object."""
    from model.hub import RANDOM
    from model.weights import backbone_file, fetch_hub_file, is_local, local_path, verified_sha256

    if weights == RANDOM:
        return RANDOM
    if weights and not is_local(weights):
        return _remote_digest(weights, storage_options)
    path = local_path(weights) if weights else fetch_hub_file(backbone_file(backbone))  # cached by the build
    return "sha256:" + verified_sha256(path)


def _remote_digest(url: str, storage_options: dict | None) -> str:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag:
        return f"etag:{str(etag).strip(chr(34))}:{info.get('size')}"
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# ---- resume ----------------------------------------------------------------------------------------


def recorded_identity(out: str, storage_options: dict | None) -> dict | None:
    from pipeline.io.records import read_json

    return read_json(f"{out}/{IDENTITY_NAME}", storage_options)


def write_identity(out: str, identity: dict, storage_options: dict | None) -> None:
    from pipeline.io.records import write_json

    write_json(f"{out}/{IDENTITY_NAME}", {"digest": digest(identity), "settings": identity}, storage_options)


class RowIdentities:
    """What the identity check needs of predictions/ rows, noted part by part as a resume reads
    them (`pipeline.segment.resume`): the digests the rows carry (None for rows without one), and
    the model and head of the rows without one, with how many there are."""

    def __init__(self):
        self.rows, self.digests, self.legacy, self.legacy_rows = 0, set(), set(), 0

    def note(self, table) -> None:
        """Take in a table with the identity column (and model and head_checksum where some rows
        have no identity)."""
        import pyarrow.compute as pc

        from model.redact import redact_text

        self.rows += len(table)
        self.digests.update(pc.unique(table["identity"]).to_pylist())
        if table["identity"].null_count:
            rows = table.filter(table["identity"].is_null())
            models = [redact_text(m or "") for m in rows["model"].to_pylist()]
            self.legacy.update(zip(models, rows["head_checksum"].to_pylist(), strict=True))
            self.legacy_rows += len(rows)


def check_identity(out: str, rows: RowIdentities, identity: dict, given, storage_options: dict | None) -> None:
    """Refuse to resume (DinosegError naming the option) when OUTPUT's masks, whose rows `rows`
    noted, were made otherwise than with `identity`; if not, every predictions row's key is done.
    `given`: the run's options as the user gave them (what rows of an earlier version are compared
    with, through their run.json)."""
    if not rows.rows:
        return
    mine = digest(identity)
    recorded = recorded_identity(out, storage_options) or {}
    legacy_as = recorded.get("digest")  # rows without a digest, vouched for by the run that wrote identity.json
    digests = {d if d is not None else legacy_as for d in rows.digests}
    for other in sorted(d for d in digests if d is not None and d != mine):
        settings = recorded.get("settings") if recorded.get("digest") == other else None
        raise DinosegError(_mismatch(settings, identity))
    if None in digests:
        _check_legacy(out, rows, identity, given, storage_options)


def _mismatch(settings: dict | None, identity: dict) -> str:
    fix = "pass --overwrite to redo them, or give another OUTPUT."
    if not settings:
        return f"OUTPUT's masks were made with other weights or settings than this run's: {fix}"
    for name in ("model", "head"):
        if settings.get(name) != identity.get(name):
            was, now = (
                (settings[name], identity[name])
                if name == "model"
                else (f"head {str(settings[name])[:12]}", f"head {str(identity[name])[:12]}")
            )
            return f"OUTPUT's masks were made by another model ({was}) than this run's ({now}): {fix}"
    for name, option in OPTIONS.items():
        if settings.get(name) != identity.get(name):
            was, now = _shown(name, settings.get(name)), _shown(name, identity.get(name))
            return f"OUTPUT's masks were made with {option} {was}, this run asks for {now}: {fix}"
    return f"OUTPUT's masks were made with other settings than this run's: {fix}"


def _shown(name: str, value) -> str:
    if name in ("head", "backbone_weights") and isinstance(value, str):
        return value[:19]  # a digest: its start tells two apart
    if name == "tta":
        return "on" if value else "off"
    return "(default)" if value is None else str(value)


def _check_legacy(out: str, rows: RowIdentities, identity: dict, given, storage_options: dict | None) -> None:
    """Rows of an earlier version: their model and head, and the options their run.json recorded."""
    from pipeline.io.records import read_json

    seen = rows.legacy
    for model, checksum in sorted(seen):
        if (model, checksum) != (identity["model"], identity["head"]):
            raise DinosegError(
                f"OUTPUT's masks were made with another model ({model}, head {str(checksum)[:12]}) than this run's "
                f"({identity['model']}, head {identity['head'][:12]}): pass --overwrite to redo them, or give another OUTPUT."
            )
    earlier = (read_json(f"{out}/run.json", storage_options) or {}).get("arguments") or {}
    for name in ("backbone_weights", "resolution", "mode", "crop", "stride", "tta", "precision"):
        if name in ("crop", "stride") and getattr(given, "mode", "whole") != "slide":
            continue
        if name in earlier and earlier[name] != getattr(given, name):
            raise DinosegError(
                f"OUTPUT's masks were made with --{name.replace('_', '-')} {earlier[name]}, this run asks for "
                f"{getattr(given, name)}: pass --overwrite to redo them, or give another OUTPUT."
            )
    log.info("%d rows of an earlier version resumed: their model, head and recorded options match", rows.legacy_rows)
