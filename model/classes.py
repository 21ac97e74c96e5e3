"""Class maps: names, colours and the ignore index. ADE20K and VOC2012 ship as data files.

A class-map file (YAML or JSON, any fsspec URL) holds
`{ignore_index: 255, classes: [{id, name, color: [r, g, b]}, ...]}` with ids 0..N-1, or 1..N
when `ignore_index` is 0 (datasets whose 0 means "unlabeled", like raw ADE20K). The ids are the
mask values of the classes; `ignore_index` is the mask value of "no label" and is never a class.

Without `ignore_index` a map takes 255, or 65535 when it has more than 255 classes (255 is a
class there; 65535 is the largest 16-bit mask value, and masks past 256 classes are 16-bit).
Inside dinoseg a class is its 0-based position and "ignore" is `IGNORE_INDEX` (`internal()`):
`to_indices` turns a mask in a map's own values into that once, where labels are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import numpy as np

from .errors import DinosegError
from .storage import options_for

IGNORE_INDEX = 255
WIDE_IGNORE_INDEX = 65535  # the default past 255 classes: the largest 16-bit mask value
MAX_MASK_VALUE = 65535  # masks are 8- or 16-bit
BUNDLED = ("ade20k", "voc2012")


@dataclass(frozen=True)
class ClassMap:
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore_index: int | None = None  # None: default_ignore_index(len(names))
    first_id: int = 0  # the mask value of names[0]: 0, or 1 when ignore_index is 0

    def __post_init__(self):
        if len(self.names) != len(self.colors):
            raise DinosegError(
                f"class map has {len(self.names)} names but {len(self.colors)} colours: give each class one colour."
            )
        if not self.names:
            raise DinosegError("class map has no classes: list at least one {id, name, color}.")
        if self.ignore_index is None:
            object.__setattr__(self, "ignore_index", default_ignore_index(len(self.names)))
        check_ignore_index(self.ignore_index, len(self.names), self.first_id)

    def __len__(self) -> int:
        return len(self.names)

    def palette(self) -> list[int]:
        """A 768-entry flat RGB palette for PIL mode 'P' (unused entries black, ignore white)."""
        flat = [0] * 768
        for i, color in enumerate(self.colors[:256]):
            flat[3 * i : 3 * i + 3] = list(color)
        if 0 <= self.ignore_index < 256 and self.ignore_index >= len(self):
            flat[3 * self.ignore_index : 3 * self.ignore_index + 3] = [255, 255, 255]
        return flat

    def internal(self) -> "ClassMap":
        """This map as dinoseg's own masks and heads hold it: ids 0..N-1 and the default ignore
        index (255, or 65535 past 255 classes). The same map when it is already so."""
        if self.first_id == 0 and self.ignore_index == default_ignore_index(len(self)):
            return self
        return ClassMap(self.names, self.colors)

    def require_own_values(self, source: str, what: str, ignore_too: bool = True) -> "ClassMap":
        """This map, when its classes count from 0 (and, with `ignore_too`, its ignore index is
        the default): what a command that mixes the map's masks with dinoseg's own needs.
        Otherwise one sentence saying why `what` cannot take it."""
        if self.first_id or (ignore_too and self.ignore_index != self.internal().ignore_index):
            raise DinosegError(
                f"{source} has classes {self.first_id}..{self.first_id + len(self) - 1} and ignore_index "
                f"{self.ignore_index}, but {what} dinoseg's masks (classes from 0, {self.internal().ignore_index} "
                f"= ignore): renumber the masks and the map to those values first."
            )
        return self

    def to_indices(self, mask: np.ndarray, what: str = "the mask") -> np.ndarray:
        """A mask in this map's values -> class positions, `internal()`'s ignore index
        where it holds this map's (`mask_indices`)."""
        return mask_indices(mask, len(self), self.ignore_index, self.first_id, what=what)

    def to_dict(self) -> dict:
        return {
            "ignore_index": self.ignore_index,
            "classes": [
                {"id": self.first_id + i, "name": n, "color": list(c)}
                for i, (n, c) in enumerate(zip(self.names, self.colors, strict=True))
            ],
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "class map", written_by_dinoseg: bool = False) -> "ClassMap":
        """`written_by_dinoseg`: a map dinoseg stored itself (a head checkpoint's, or an old
        segment OUTPUT's classes.yaml: `load_class_map`). Before the ignore index was checked,
        dinoseg wrote 255 for every map, a class id past 255 classes: such a map is read with
        today's default (65535) instead of being refused."""
        try:
            entries = sorted(d["classes"], key=lambda c: int(c["id"]))
            ids = [int(c["id"]) for c in entries]
            ignore = d.get("ignore_index")
            if written_by_dinoseg and ignore == IGNORE_INDEX and len(ids) > IGNORE_INDEX:
                ignore = None
            first = 1 if ignore == 0 and ids[:1] == [1] else 0
            if ids != list(range(first, first + len(ids))):
                raise DinosegError(
                    f"{source}: class ids must be 0..N-1 without gaps (or 1..N with ignore_index 0), "
                    f"got {ids[:5]}...: renumber the classes."
                )
            names = tuple(str(c["name"]) for c in entries)
            colors = tuple(tuple(int(v) for v in c.get("color") or default_color(i)) for i, c in enumerate(entries))
            if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colors):
                raise DinosegError(f"{source}: every colour must be three integers 0..255.")
            try:
                return cls(names, colors, ignore, first)
            except DinosegError as e:
                raise DinosegError(f"{source}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise DinosegError(
                f"{source} is not a class map ({e}): give {{ignore_index, classes: [{{id, name, color}}]}}."
            ) from None


def mask_indices(
    mask: np.ndarray,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    first_id: int = 0,
    ignore_to: int | None = None,
    what: str = "the mask",
) -> np.ndarray:
    """A mask in a class map's values (classes first_id.., `ignore_index` = no label) -> class
    positions 0..N-1 and `ignore_to` (default: the internal ignore index for N classes)
    where it held `ignore_index`: the one place a map's own values become dinoseg's. A value
    that is neither a class nor the ignore index is a DinosegError naming it, never guessed at."""
    mask = np.asarray(mask)
    ignore_to = default_ignore_index(num_classes) if ignore_to is None else ignore_to
    if mask.dtype.kind == "u" and mask.dtype.itemsize <= 2:
        # 8- and 16-bit masks (what the PNG reader gives) go through a table of every value: one
        # pass, no int64 copy of a 50 MP mask, and masks already in dinoseg's values come back as is
        top = np.iinfo(mask.dtype).max
        valid = np.zeros(top + 1, bool)
        valid[first_id : first_id + num_classes] = True
        if ignore_index <= top:
            valid[ignore_index] = True
        bad = ~valid[mask]
        if not bad.any():
            if first_id == 0 and (ignore_index == ignore_to or ignore_index > top):
                return mask
            dtype = np.uint8 if max(ignore_to, num_classes - 1) <= 255 else np.uint16
            lut = np.zeros(top + 1, dtype)
            lut[first_id : first_id + num_classes] = np.arange(num_classes, dtype=dtype)
            if ignore_index <= top:
                lut[ignore_index] = ignore_to
            return lut[mask]
        values = mask[bad]
    else:
        values = mask.astype(np.int64)
        ignored = values == ignore_index
        classes = values - first_id
        bad = ~ignored & ((classes < 0) | (classes >= num_classes))
        if not bad.any():
            return np.where(ignored, ignore_to, classes)
        values = values[bad]
    stray = np.unique(values)
    value = int(stray[-1]) if stray[-1] >= 0 else int(stray[0])
    raise DinosegError(
        f"{what} holds class {value} but the class map has {num_classes} classes "
        f"({first_id}..{first_id + num_classes - 1}, {ignore_index} = ignore): "
        "pass the class map these masks were made with."
    )


def default_ignore_index(num_classes: int) -> int:
    """255 (8-bit masks' convention), or 65535 when 255 is a class id (more than 255 classes)."""
    return IGNORE_INDEX if num_classes <= IGNORE_INDEX else WIDE_IGNORE_INDEX


def check_ignore_index(ignore, num_classes: int, first_id: int = 0) -> None:
    """One sentence when `ignore` is not a mask value that no class has."""
    if first_id not in (0, 1) or (first_id == 1 and ignore != 0):
        raise DinosegError(f"class ids start at {first_id}: start them at 0 (or at 1 with ignore_index 0).")
    if isinstance(ignore, bool) or not isinstance(ignore, (int, np.integer)):
        raise DinosegError(
            f"ignore_index {ignore!r} is not an integer: give the mask value of unlabeled pixels, such as 255."
        )
    if not 0 <= ignore <= MAX_MASK_VALUE:
        raise DinosegError(
            f"ignore_index {ignore} is outside the mask values 0..{MAX_MASK_VALUE}: give the mask value of unlabeled pixels."
        )
    if first_id <= ignore < first_id + num_classes:
        raise DinosegError(
            f"ignore_index {ignore} is also the id of class {ignore} (ids {first_id}..{first_id + num_classes - 1}): "
            f"give a value that is no class, such as {default_ignore_index(num_classes)}"
            + (" (or number the classes from 1 when 0 means unlabeled)." if ignore == 0 else ".")
        )


def default_color(i: int) -> tuple[int, int, int]:
    """The VOC-style bit-interleaved colour for class i, for class maps without colours."""
    r = g = b = 0
    c = i
    for j in range(8):
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    return (r, g, b)


def bundled(name: str) -> ClassMap:
    if name not in BUNDLED:
        raise DinosegError(f"No bundled class map '{name}'; bundled: {', '.join(BUNDLED)}.")
    text = resources.files(__package__).joinpath("data", f"{name}.json").read_text()
    return ClassMap.from_dict(json.loads(text), source=f"bundled {name}")


def load_class_map(url: str, storage_options: dict | None = None) -> ClassMap:
    """A bundled name ('ade20k', 'voc2012') or a YAML/JSON file at a local path or fsspec URL."""
    if url in BUNDLED:
        return bundled(url)
    data = read_class_map_file(url, storage_options)
    return ClassMap.from_dict(data, source=url, written_by_dinoseg=_old_segment_output(url, data, storage_options))


def _old_segment_output(url: str, data: dict, storage_options: dict | None) -> bool:
    """Whether `data`, a map of more than 255 classes that says ignore_index 255 (one of its class
    ids), is the classes.yaml that `dinoseg segment` wrote beside its masks before the ignore
    index was checked (it wrote 255 for every map). Those masks are argmax values, where 255 is
    class 255 and no pixel is unlabeled: the map is read with today's default ignore index, as a
    head checkpoint's is. Any other such map is refused (ClassMap): a user's map says what it
    means; an import's from then (its 255 meant both class 255 and "no label") is refused here,
    in one sentence with the fix. Told apart by the run's own files beside it, never by the map."""
    classes = data.get("classes")
    if data.get("ignore_index") != IGNORE_INDEX or not isinstance(classes, list) or len(classes) <= IGNORE_INDEX:
        return False
    folder, _, name = url.rstrip("/").rpartition("/")
    if name != "classes.yaml":
        return False
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(folder or ".", **options_for(url, storage_options))
        if fs.isfile(f"{root}/import.json"):
            raise DinosegError(
                f"{url} has {len(classes)} classes and ignore_index 255, which is class 255's id: an import made "
                f"before ignore_index was checked, whose masks' 255 is both class 255 and unlabeled; import again "
                f"into {folder or '.'} with --overwrite (masks past 255 classes now use 65535 for unlabeled)."
            )
        with fs.open(f"{root}/run.json", "rt") as f:
            run = json.load(f)
    except (FileNotFoundError, OSError, ValueError):
        return False
    return isinstance(run, dict) and "model" in run and "head_checksum" in run  # segment's run.json


def read_class_map_file(url: str, storage_options: dict | None = None) -> dict:
    """A class-map file's content as written (entries may hold more than id, name and colour:
    text heads read their prompts), not yet checked as a ClassMap."""
    import fsspec
    import yaml

    try:
        with fsspec.open(url, "rt", **options_for(url, storage_options)) as f:
            text = f.read()
    except (FileNotFoundError, OSError) as e:
        raise DinosegError(f"Cannot read the class map {url} ({e}): check the path.") from None
    try:
        data = json.loads(text) if url.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise DinosegError(f"{url} is not valid YAML/JSON ({e}): fix the file.") from None
    if not isinstance(data, dict):
        raise DinosegError(f"{url} is not a class map: give {{ignore_index, classes: [{{id, name, color}}]}}.")
    return data


def class_map_text(classes: ClassMap, url: str) -> str:
    """The map as the file `url` names holds it: JSON for a .json name, YAML otherwise."""
    import yaml

    if url.endswith(".json"):
        return json.dumps(classes.to_dict(), indent=1)
    return yaml.safe_dump(classes.to_dict(), sort_keys=False)


def save_class_map(classes: ClassMap, url: str, storage_options: dict | None = None) -> None:
    """Write the map atomically (a reader sees the old file or all of the new one; train, export
    and evaluate read it): a local file through a temporary name in its folder, then a rename,
    the temporary name of the pipeline's writes (`.<name>.<8 hex>.dinoseg-tmp`, which readers skip
    and a run's sweep removes after a kill); elsewhere one PUT (`pipe_file`), whole on an object
    store. The pipeline writes OUTPUT's own copy with `pipeline.io.records.write_text`."""
    import fsspec

    from .storage import write_local_atomic

    data = class_map_text(classes, url).encode()
    fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
    if fsspec.utils.get_protocol(url) not in ("file", "local"):
        fs.pipe_file(path, data)  # object stores have no folders to make
        return
    write_local_atomic(path, data)
