"""Readers of the labeling tools' exports, for `dinoseg import` (`pipeline.label.import_labels`).

`open_source` opens SOURCE (a folder, a .zip, a .json; local or any fsspec URL) as one
filesystem; `read_records` runs the format's reader: (label names, records, the export's own
images folder). A reader checks its format before it yields anything, so a wrong --format or a
broken export ends in one sentence before OUTPUT is touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

from model.errors import DinosegError
from model.storage import options_for
from pipeline.label.imports.coco import MATCHES
from pipeline.label.imports.common import CROWDS, OVERLAPS, Record

FORMATS = ("cvat", "coco", "labelstudio")

__all__ = ["CROWDS", "FORMATS", "MATCHES", "OVERLAPS", "Source", "open_source", "read_records"]


@dataclass
class Source:
    url: str  # SOURCE as given (absolute)
    fs: object  # the filesystem its files are read through (a ZipFileSystem for a .zip)
    root: str  # SOURCE's path in `fs` ('' for the top of a zip)
    archive: bool  # files inside it have no URL of their own: images are copied out
    colours: dict = field(default_factory=dict)  # label -> colour, where the export declares them

    def url_of(self, path: str) -> str:
        """A URL for a file of the source, as rows hold it (local files as absolute paths)."""
        from pipeline.data.keys import row_url

        return row_url(self.fs, path)


def open_source(url: str, storage_options: dict | None) -> Source:
    from fsspec.core import url_to_fs

    try:
        fs, path = url_to_fs(url, **options_for(url, storage_options))
        exists, is_file = fs.exists(path), fs.isfile(path)
    except (OSError, ValueError, ImportError) as e:
        raise DinosegError(f"cannot open SOURCE '{url}' ({e}): check the URL and the storage options.") from None
    if not exists:
        raise DinosegError(f"SOURCE '{url}' does not exist: check the path.")
    if is_file and path.lower().endswith(".zip"):
        import zipfile

        from fsspec.implementations.zip import ZipFileSystem

        try:
            zfs = ZipFileSystem(fo=fs.open(path, "rb"))
        except zipfile.BadZipFile:
            raise DinosegError(f"SOURCE '{url}' is not a valid zip archive: export it again.") from None
        top = list(zfs.ls("", detail=False))
        # an archive whose files sit in one top folder (zipped with its folder) is read from there
        root = top[0] if len(top) == 1 and zfs.isdir(top[0]) else ""
        return Source(url, zfs, root.strip("/"), archive=True)
    return Source(url, fs, path.rstrip("/"), archive=False)


def read_records(
    source: Source, fmt: str, images_root: Optional[str], config
) -> tuple[list[str], Iterator[Record], Optional[str]]:
    """(label names, records, the export's images folder in source.fs or None)."""
    fs, root = source.fs, source.root
    if fmt == "cvat":
        from pipeline.label.imports.cvat import read_cvat

        labels, records, inner, source.colours = read_cvat(fs, root)
        return labels, records, inner
    if fmt == "coco":
        from pipeline.label.imports.coco import coco_name_root, find_annotation_files, read_coco

        files = find_annotation_files(fs, root)
        inner = None if images_root else coco_name_root(root, fs)
        labels, records = read_coco(fs, files, images_root or inner, config.match)
        return labels, records, inner
    if fmt == "labelstudio":
        from pipeline.label.imports.labelstudio import read_labelstudio

        path = root
        if fs.isdir(root):
            found = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".json"))
            if len(found) != 1:
                raise DinosegError(
                    f"'{source.url}' is a folder with {len(found)} .json files: pass Label Studio's JSON export file itself."
                )
            path = found[0]
        labels, records = read_labelstudio(fs, path, images_root, config.predictions, config.image_field)
        return labels, records, None
    raise DinosegError(f"unknown format '{fmt}': use one of {', '.join(FORMATS)}.")
