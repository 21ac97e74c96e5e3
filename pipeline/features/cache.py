"""The feature cache: frozen-backbone features computed once, then read by every epoch.

The backbone is frozen, so its features of an image at a resolution never change: a Ray Data
pass (`ComputeFeatures` actors, on GPUs where there are some) computes them once and
`WriteFeatures` stores them, fp16, as Parquet parts under

    CACHE/<backbone>-<weights>-r<resolution>-l<layers>/part-<uuid>.parquet

one row per image, keyed by the image's URL. Masks are not cached: they are read fresh every
epoch (`CachedSamples`), so corrected labels are picked up without recomputing features, and
nothing in the cache depends on the class map (its classes or ignore index): the folder's
name holds only what changes the features. A part
appears whole or not at all, so an interrupted pass resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.classes import IGNORE_INDEX
from model.geometry import IMAGENET_MEAN, IMAGENET_STD, PATCH_SIZE
from model.storage import options_for
from pipeline.data.schema import failed, object_array, set_error
from pipeline.features.pairs import decode_label, pad_label, padded_geometry, refuse_unread, resize_pair
from pipeline.io.files import write_bytes_atomic

log = logging.getLogger(__name__)

CACHE_SCHEMA = pa.schema(
    [
        ("image", pa.string()),  # the image's URL: the cache key
        ("width", pa.int32()),
        ("height", pa.int32()),  # original size (the mask's)
        ("resized_h", pa.int32()),
        ("resized_w", pa.int32()),  # after the short-side resize
        ("pad_top", pa.int16()),
        ("pad_left", pa.int16()),  # centre padding to whole patches
        ("grid_h", pa.int32()),
        ("grid_w", pa.int32()),
        ("channels", pa.int32()),
        ("features", pa.large_binary()),  # float16 (channels, grid_h, grid_w), C order
    ]
)


@dataclass(frozen=True)
class FeatureConfig:
    backbone: str
    layers: tuple[int, ...]
    resolution: int
    backbone_weights: str | None = None  # None: the released weights; 'random' for tests
    device: str | None = None
    precision: str = "auto"
    batch_size: int = 8
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    storage_options: dict | None = field(default=None, repr=False)  # credentials: never in a repr
    weights_env: dict = field(default_factory=dict, repr=False)  # the driver's (model.weights.weights_env)

    def folder(self, cache: str) -> str:
        """Where these features live: everything that changes them is in the name."""
        if self.backbone_weights in (None, "random"):
            weights = self.backbone_weights or "released"
        else:
            weights = hashlib.sha256(self.backbone_weights.encode()).hexdigest()[:12]
        layers = "_".join(str(i) for i in self.layers)
        return f"{cache.rstrip('/')}/{self.backbone}-{weights}-r{self.resolution}-l{layers}"


def feature_config(
    backbone: str,
    layers,
    resolution: int,
    backbone_weights: str | None,
    precision: str = "auto",
    storage_options: dict | None = None,
) -> FeatureConfig:
    """The FeatureConfig of a run, with the driver's hub and cache settings for the actors."""
    from model.weights import weights_env

    return FeatureConfig(
        backbone,
        tuple(layers),
        resolution,
        backbone_weights,
        precision=precision,
        storage_options=storage_options,
        weights_env=weights_env(),
    )


def cached_sizes(folder: str, storage_options: dict | None = None) -> dict[str, tuple[int, int]]:
    """image URL -> (width, height) for every image in the complete parts under `folder`."""
    import fsspec

    out = {}
    for url in part_files(folder, storage_options):
        with fsspec.open(url, "rb", **options_for(url, storage_options)) as f:
            t = pq.read_table(f, columns=["image", "width", "height"])
        out.update(
            zip(t["image"].to_pylist(), zip(t["width"].to_pylist(), t["height"].to_pylist(), strict=True), strict=True)
        )
    return out


def part_files(folder: str, storage_options: dict | None = None) -> list[str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(folder, **options_for(folder, storage_options))
    if not fs.exists(root):
        return []
    paths = [p for p in sorted(fs.find(root)) if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(".")]
    return [fs.unstrip_protocol(p) if "://" in folder else p for p in paths]


class ComputeFeatures:
    """Actor: {pixels (resized), ...} -> - pixels, + the CACHE_SCHEMA columns for rows it computed.
    Rows without pixels (failed, or cached already) pass through."""

    def __init__(self, config: FeatureConfig):
        import torch

        from model.device import choose_device, choose_precision
        from model.hub import load_backbone
        from model.weights import use_weights_env

        use_weights_env(config.weights_env)

        self.config = config
        self.device = choose_device(config.device)
        self.precision = choose_precision(config.precision, self.device)
        self.backbone = load_backbone(config.backbone, config.backbone_weights, config.storage_options)
        self.backbone.requires_grad_(False).eval().to(self.device)
        if self.device.type == "cpu":  # Ray sets OMP_NUM_THREADS to the actor's request
            torch.set_num_threads(len(os.sched_getaffinity(0)))
        self.mean = torch.tensor(config.mean, device=self.device).view(3, 1, 1) * 255
        self.std = torch.tensor(config.std, device=self.device).view(3, 1, 1) * 255

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k not in ("pixels", "label")}
        n = len(out["path"])
        ints = {
            c: np.zeros(n, np.int64)
            for c in ("resized_h", "resized_w", "pad_top", "pad_left", "grid_h", "grid_w", "channels")
        }
        feats = [b""] * n
        groups: dict[tuple[int, int], list[int]] = {}
        bad = failed(batch)
        for i, px in enumerate(batch["pixels"]):
            if not bad[i] and px.size:
                groups.setdefault(px.shape[:2], []).append(i)
        for (h, w), rows in groups.items():
            gh, gw, top, left = padded_geometry(h, w)
            for s in range(0, len(rows), self.config.batch_size):
                chunk = rows[s : s + self.config.batch_size]
                try:
                    maps = self._forward([batch["pixels"][i] for i in chunk], gh, gw, top, left)
                except Exception as e:  # out of memory, a bad image: cost these rows, not the pass
                    for i in chunk:
                        set_error(
                            out,
                            i,
                            "features",
                            f"could not compute features ({type(e).__name__}: {e}).",
                            type(e).__name__,
                        )
                    continue
                for i, m in zip(chunk, maps, strict=True):
                    feats[i] = m.tobytes()
                    for c, v in zip(ints, (h, w, top, left, gh, gw, m.shape[0]), strict=True):
                        ints[c][i] = v
        out.update(ints)
        out["features"] = object_array(feats)
        return out

    def _forward(self, images: list[np.ndarray], gh: int, gw: int, top: int, left: int) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        from model.device import autocast

        x = torch.stack([torch.from_numpy(np.array(im)) for im in images]).to(
            self.device
        )  # copies: Ray hands read-only views
        x = (x.permute(0, 3, 1, 2).float() - self.mean) / self.std
        h, w = x.shape[-2:]
        x = F.pad(x, (left, gw * PATCH_SIZE - w - left, top, gh * PATCH_SIZE - h - top))
        with torch.inference_mode(), autocast(self.device, self.precision):
            maps = self.backbone.get_intermediate_layers(x, n=list(self.config.layers), reshape=True, norm=True)
        return torch.cat([m.float() for m in maps], dim=1).half().cpu().numpy()


class WriteFeatures:
    """Write the rows that have features as one Parquet part; pass the rest on without them."""

    def __init__(self, folder: str, storage_options: dict | None = None):
        self.folder = folder.rstrip("/")
        self.storage_options = storage_options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != "features"}
        rows = [i for i, f in enumerate(batch["features"]) if len(f)]
        if rows:
            cols = {"image": [str(batch["image"][i]) for i in rows]}
            for name in CACHE_SCHEMA.names[1:-1]:
                cols[name] = [int(batch[name][i]) for i in rows]
            cols["features"] = [batch["features"][i] for i in rows]
            buf = io.BytesIO()
            pq.write_table(pa.table(cols, schema=CACHE_SCHEMA), buf, compression="zstd")
            try:
                write_bytes_atomic(
                    f"{self.folder}/part-{uuid.uuid4().hex}.parquet", buf.getvalue(), self.storage_options
                )
            except Exception as e:
                for i in rows:
                    set_error(
                        out,
                        i,
                        "write",
                        f"could not write to the feature cache {self.folder} ({type(e).__name__}: {e}).",
                    )
        return out


@dataclass(frozen=True)
class SampleConfig:
    masks: dict  # image URL -> mask URL: the rows of this split (others are dropped)
    num_classes: int
    crop_cells: int | None = None  # training: random crops of this many patches a side; None: whole
    flip: bool = True
    seed: int | None = None
    storage_options: dict | None = field(default=None, repr=False)  # credentials: never in a repr
    ignore_index: int = IGNORE_INDEX  # the class map's mask values (decode_label)
    first_id: int = 0


class CachedSamples:
    """Cache rows -> {features (C, h, w) float16, label (14h, 14w) uint8} for the rows of one split.

    Training (`crop_cells`): a random crop of the feature map and the same crop of the label, and
    a random flip of both; fixed shapes, so the rows stack. Validation: the whole map."""

    def __init__(self, config: SampleConfig):
        from pipeline.data.sources import ReadBytes

        self.config = config
        self.read = ReadBytes(config.storage_options)
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg = self.config
        rows = [i for i, url in enumerate(batch["image"]) if url in cfg.masks]
        paths = np.asarray([cfg.masks[batch["image"][i]] for i in rows], dtype=object)
        read = self.read({"path": paths}) if rows else {"bytes": [], "error_stage": []}
        refuse_unread(read)  # a mask the store failed to give is never trained as all-ignore
        masks = read["bytes"]
        feats, labels = [], []
        for i, data in zip(rows, masks, strict=True):
            c, gh, gw = (int(batch[k][i]) for k in ("channels", "grid_h", "grid_w"))
            f = np.frombuffer(batch["features"][i], np.float16).reshape(c, gh, gw)
            label = self._label(data, batch, i)
            if cfg.crop_cells:
                f, label = self._crop(f, label)
            feats.append(np.ascontiguousarray(f))
            labels.append(np.ascontiguousarray(label))
        if cfg.crop_cells:
            return {
                "features": np.stack(feats) if feats else np.zeros((0, 1, 1, 1), np.float16),
                "label": np.stack(labels) if labels else np.zeros((0, 1, 1), np.uint8),
            }
        return {"features": object_array(feats), "label": object_array(labels)}

    def _label(self, data: bytes, batch, i: int) -> np.ndarray:
        h, w = int(batch["resized_h"][i]), int(batch["resized_w"][i])
        try:
            cfg = self.config
            label = decode_label(data, cfg.num_classes, ignore_index=cfg.ignore_index, first_id=cfg.first_id)
            if label.shape != (int(batch["height"][i]), int(batch["width"][i])):
                raise ValueError(f"size {label.shape[::-1]} differs from the image's")
        except Exception as e:  # changed since the check: train on it as 'ignore', say so
            log.warning("mask of %s is unusable now (%s); its pixels are ignored this epoch", batch["image"][i], e)
            label = np.full((h, w), IGNORE_INDEX, np.uint8)
        _, label = resize_pair(None, label, h, w)
        return pad_label(
            label, int(batch["grid_h"][i]), int(batch["grid_w"][i]), int(batch["pad_top"][i]), int(batch["pad_left"][i])
        )

    def _crop(self, f: np.ndarray, label: np.ndarray):
        n = self.config.crop_cells
        c, gh, gw = f.shape
        if gh < n or gw < n:  # a small map: pad to the crop (zero features, ignored labels)
            f = np.pad(f, ((0, 0), (0, max(n - gh, 0)), (0, max(n - gw, 0))))
            label = np.pad(
                label,
                ((0, max(n - gh, 0) * PATCH_SIZE), (0, max(n - gw, 0) * PATCH_SIZE)),
                constant_values=IGNORE_INDEX,
            )
            gh, gw = f.shape[1:]
        y, x = int(self.rng.integers(0, gh - n + 1)), int(self.rng.integers(0, gw - n + 1))
        f = f[:, y : y + n, x : x + n]
        label = label[y * PATCH_SIZE : (y + n) * PATCH_SIZE, x * PATCH_SIZE : (x + n) * PATCH_SIZE]
        if self.config.flip and self.rng.random() < 0.5:
            f, label = f[:, :, ::-1], label[:, ::-1]
        return f, label
