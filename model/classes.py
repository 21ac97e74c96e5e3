"""Class maps: names, colours and the ignore index. ADE20K and VOC2012 ship as data files.

A class-map file (YAML or JSON, any fsspec URL) holds
`{ignore_index: 255, classes: [{id, name, color: [r, g, b]}, ...]}` with ids 0..N-1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from .errors import DinosegError

IGNORE_INDEX = 255
BUNDLED = ("ade20k", "voc2012")


@dataclass(frozen=True)
class ClassMap:
    names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self):
        if len(self.names) != len(self.colors):
            raise DinosegError(
                f"class map has {len(self.names)} names but {len(self.colors)} colours: give each class one colour."
            )
        if not self.names:
            raise DinosegError("class map has no classes: list at least one {id, name, color}.")

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

    def to_dict(self) -> dict:
        return {
            "ignore_index": self.ignore_index,
            "classes": [
                {"id": i, "name": n, "color": list(c)}
                for i, (n, c) in enumerate(zip(self.names, self.colors, strict=True))
            ],
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "class map") -> "ClassMap":
        try:
            entries = sorted(d["classes"], key=lambda c: int(c["id"]))
            ids = [int(c["id"]) for c in entries]
            if ids != list(range(len(ids))):
                raise DinosegError(
                    f"{source}: class ids must be 0..N-1 without gaps, got {ids[:5]}...: renumber the classes."
                )
            names = tuple(str(c["name"]) for c in entries)
            colors = tuple(tuple(int(v) for v in c.get("color") or default_color(i)) for i, c in enumerate(entries))
            if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colors):
                raise DinosegError(f"{source}: every colour must be three integers 0..255.")
            return cls(names, colors, int(d.get("ignore_index", IGNORE_INDEX)))
        except (KeyError, TypeError, ValueError) as e:
            raise DinosegError(
                f"{source} is not a class map ({e}): give {{ignore_index, classes: [{{id, name, color}}]}}."
            ) from None


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
    return ClassMap.from_dict(read_class_map_file(url, storage_options), source=url)


def read_class_map_file(url: str, storage_options: dict | None = None) -> dict:
    """A class-map file's content as written (entries may hold more than id, name and colour:
    text heads read their prompts), not yet checked as a ClassMap."""
    import fsspec
    import yaml

    try:
        with fsspec.open(url, "rt", **(storage_options or {})) as f:
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


def save_class_map(classes: ClassMap, url: str, storage_options: dict | None = None) -> None:
    import fsspec
    import yaml

    text = (
        json.dumps(classes.to_dict(), indent=1)
        if url.endswith(".json")
        else yaml.safe_dump(classes.to_dict(), sort_keys=False)
    )
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if fsspec.utils.get_protocol(url) in ("file", "local"):
        fs.makedirs(fs._parent(path), exist_ok=True)  # object stores have no folders to make
    with fs.open(path, "wt") as f:
        f.write(text)
