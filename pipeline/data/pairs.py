"""A labeled set: (image, mask) pairs by key, and the train/validation split.

Two ways to name a labeled set:
- IMAGES and MASKS folders (any fsspec URL), paired by key: `images/a/b.jpg` <-> `masks/a/b.png`.
- a manifest (.csv or .parquet) with `image` and `mask` columns; relative entries are relative to
  the manifest's folder, and the key is the `key` column where there is one (`dinoseg import`
  writes it), else the image entry without its extension.

A key with only one half is a problem row (reported, left out), never fatal by itself.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass, field

from fsspec.core import split_protocol, url_to_fs

from model.errors import DinosegError
from model.storage import options_for
from pipeline.data.keys import extension, row_url
from pipeline.data.sources import list_inputs
from pipeline.io.masks import check_key

PAIR_MANIFESTS = ("csv", "parquet")


@dataclass
class Pairs:
    keys: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)
    problems: list[dict] = field(default_factory=list)  # {key, image, mask, stage, message}

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, key: str, image: str, mask: str) -> None:
        self.keys.append(key)
        self.images.append(image)
        self.masks.append(mask)

    def subset(self, indices) -> "Pairs":
        out = Pairs()
        for i in indices:
            out.add(self.keys[i], self.images[i], self.masks[i])
        return out


def problem(key: str, image: str, mask: str, stage: str, message: str) -> dict:
    return {"key": key, "image": image, "mask": mask, "stage": stage, "message": message}


def list_pairs(
    images: str, masks: str | None = None, storage_options: dict | None = None, what: str = "training"
) -> Pairs:
    """The pairs of a labeled set, in key order, with the keys that have one half only as problems."""
    if masks is None:
        if extension(images) not in PAIR_MANIFESTS:
            raise DinosegError(
                f"no masks given for the {what} images '{images}': pass a MASKS folder, or a .csv/.parquet "
                "manifest with 'image' and 'mask' columns."
            )
        return _manifest_pairs(images, storage_options)
    found = {name: _listing(url, storage_options, name) for name, url in (("image", images), ("mask", masks))}
    out = Pairs()
    for stage_rows in found.values():
        out.problems.extend(stage_rows.pop(None, []))
    by_image, by_mask = found["image"], found["mask"]
    for key in sorted(by_image.keys() | by_mask.keys()):
        image, mask = by_image.get(key, ""), by_mask.get(key, "")
        if image and mask:
            out.add(key, image, mask)
        elif image:
            out.problems.append(problem(key, image, "", "pair", f"'{image}' has no mask {key}.png under '{masks}'."))
        else:
            out.problems.append(problem(key, "", mask, "pair", f"mask '{mask}' has no image under '{images}'."))
    if not out and not out.problems:
        raise DinosegError(
            f"no {what} images were found under '{images}': check the path (any of .jpg, .png, ... files)."
        )
    return out


def _listing(url: str, storage_options: dict | None, half: str) -> dict:
    """key -> URL; listing errors (collisions, unsafe names) under the key None."""
    out: dict = {}
    for row in list_inputs(url, storage_options):
        if row["error_stage"]:
            out.setdefault(None, []).append(
                problem(
                    row["key"],
                    row["path"] if half == "image" else "",
                    row["path"] if half == "mask" else "",
                    "list",
                    row["error_message"],
                )
            )
        else:
            out[row["key"]] = row["path"]
    return out


def _manifest_pairs(url: str, storage_options: dict | None) -> Pairs:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        fs, path = url_to_fs(url, **options_for(url, storage_options))
        with fs.open(path, "rb") as f:
            table = pacsv.read_csv(f) if extension(path) == "csv" else pq.read_table(f)
    except FileNotFoundError:
        raise DinosegError(f"the manifest '{url}' does not exist: check the path.") from None
    except Exception as e:
        raise DinosegError(
            f"cannot read the manifest '{url}' ({type(e).__name__}: {e}): check that it is a valid file."
        ) from None
    if not {"image", "mask"} <= set(table.column_names):
        raise DinosegError(
            f"the manifest '{url}' needs 'image' and 'mask' columns, it has {table.column_names}: rename them."
        )
    folder = posixpath.dirname(path)
    out, seen = Pairs(), set()
    images, masks = table.column("image").to_pylist(), table.column("mask").to_pylist()
    keys = table.column("key").to_pylist() if "key" in table.column_names else [None] * len(images)
    for entry, mask, given in zip(images, masks, keys, strict=True):
        entry = str(entry or "")
        key = _given_key(given) or _manifest_key(entry)
        image, mask = (_resolve(str(v or ""), fs, folder) for v in (entry, mask))
        if not image or not mask:
            out.problems.append(problem(key, image, mask, "pair", "a manifest row is missing its image or mask entry."))
        elif key in seen:
            out.problems.append(
                problem(
                    key,
                    image,
                    mask,
                    "list",
                    f"'{image}' has the key '{key}' of an earlier row (listed twice, or differs only by extension): keep one row per image.",
                )
            )
        else:
            seen.add(key)
            out.add(key, image, mask)
    return out


def _given_key(key) -> str:
    """A manifest's own `key` column (`dinoseg import` writes one), where it is a safe key."""
    if not isinstance(key, str) or not key:
        return ""
    try:
        return check_key(key)
    except DinosegError:
        return ""


def _manifest_key(entry: str) -> str:
    """The image entry as written, without scheme, leading '/' and extension: the key does not
    depend on where the manifest lives, so moving a dataset keeps its train/val split."""
    if not entry:
        return ""
    path = split_protocol(entry)[1].replace("\\", "/")
    return posixpath.splitext(posixpath.normpath(path).lstrip("/"))[0]


def _resolve(entry: str, fs, folder: str) -> str:
    if not entry or split_protocol(entry)[0] or entry.startswith("/"):
        return entry
    return row_url(fs, posixpath.normpath(posixpath.join(folder, entry)))


def split_pairs(pairs: Pairs, val_fraction: float, seed: int = 0) -> tuple[Pairs, Pairs]:
    """(train, val) by a hash of each key: stable across runs, and a key stays on its side
    when the set grows (a random permutation would move keys between the splits)."""
    if not 0 <= val_fraction < 1:
        raise DinosegError(f"--val-fraction {val_fraction} must be in [0, 1): e.g. 0.1 keeps a tenth for validation.")
    train, val = [], []
    for i, key in enumerate(pairs.keys):
        h = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little")
        (val if h / 2**64 < val_fraction else train).append(i)
    return pairs.subset(train), pairs.subset(val)
