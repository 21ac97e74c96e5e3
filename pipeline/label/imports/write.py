"""From records to the labeled set's files: keys (once, in listing order), then per image in
worker threads its image URL, its size, its mask (composed by `common.compose`, or the format's
raster), and the mask PNG written atomically under OUTPUT/masks/.

An outcome is a dict: {key, name, image, mask, problems, message} for an imported image, or
{key, name, image, skip, message} for one left out (the reason is one of a few words the summary
counts: not annotated, no image, empty, unreadable, duplicate key, bad key, bad reference).
"""

from __future__ import annotations

import posixpath
from typing import Iterator, Optional

from model.classes import ClassMap
from model.errors import DinosegError
from pipeline.label.imports.common import MAX_PIXELS, Record, compose, image_size, key_of


class Writer:
    def __init__(
        self,
        output: str,
        classes: ClassMap,
        source,
        images_root: Optional[str],
        inner_images: Optional[str],
        overlap: str,
        crowd: str,
        storage_options: dict | None,
    ):
        self.output, self.classes, self.source = output, classes, source
        self.images_root, self.inner, self.overlap, self.crowd = images_root, inner_images, overlap, crowd
        self.so = storage_options
        self._by_key: Optional[dict[str, str]] = None  # key -> image, for formats that name images by key
        self.copied_images = False  # whether images were copied out of the archive into OUTPUT/images/

    def keyed(self, records: Iterator[Record]) -> Iterator[tuple[Record, str, Optional[tuple[str, str]]]]:
        """(record, key, skip) in listing order: keys are decided here, one thread, so the first
        image to take a key keeps it and a second one is a problem row."""
        seen: set[str] = set()
        for record in records:
            try:
                key = record.key or key_of(record.name, self.images_root)
                from pipeline.io.masks import check_key

                check_key(key)
            except DinosegError as e:
                yield record, "", ("bad key", f"'{record.name}': {e}")
                continue
            if key in seen and not record.skip:
                yield (
                    record,
                    key,
                    ("duplicate key", f"'{record.name}' has the key '{key}' of an earlier image: it is left out"),
                )
                continue
            if not record.skip:
                seen.add(key)
            yield record, key, None

    def __call__(self, item) -> dict:
        record, key, skip = item
        out = {"key": key, "name": record.name, "image": record.image or ""}
        skip = skip or record.skip
        if skip:
            return out | {"skip": skip[0], "message": skip[1]}
        try:
            return self._import(record, key, out)
        except _Skip as s:
            return out | {"skip": s.reason, "message": f"{key}: {s.message}"}

    def _import(self, record: Record, key: str, out: dict) -> dict:
        image = self._image(record, key)
        out["image"] = image
        problems = list(record.notes)
        if record.raster is not None:
            try:
                mask, more = record.raster(self.classes)
            except Exception as e:  # a truncated or foreign file: this image is left out, never the run
                raise _Skip("unreadable", f"its mask cannot be read ({type(e).__name__}: {e})") from None
        else:
            size = record.size or self._size(image)
            if size[0] * size[1] > MAX_PIXELS or min(size) < 1:
                raise _Skip("unreadable", f"its size {size[1]}x{size[0]} is not one a mask can have")
            mask, more = compose(record, self.classes, size, self.overlap, self.crowd)
        problems += more
        if not (mask != self.classes.ignore_index).any():
            why = "; ".join(problems) or "its annotation has no labeled pixel"
            raise _Skip("empty", f"nothing to learn from: {why}")
        from pipeline.io.files import write_bytes_atomic
        from pipeline.io.masks import encode_mask_png, mask_url

        write_bytes_atomic(mask_url(self.output, key), encode_mask_png(mask, self.classes), self.so)
        message = f"{key}: " + "; ".join(problems) if problems else ""
        return out | {"mask": posixpath.join("masks", key + ".png"), "problems": problems, "message": message}

    def _image(self, record: Record, key: str) -> str:
        if record.raster is not None:  # CVAT names images by key: find the file
            image = self._keyed_images().get(key)
            if image is None:
                where = f"under '{self.images_root}'" if self.images_root else "in the export"
                raise _Skip("no image", f"no image with this key {where}: pass the images' folder with --images")
        elif record.image is None:
            raise _Skip("no image", f"'{record.name}' is a relative name: pass the folder it is under with --images")
        else:
            image = record.image
        if self.inner and image.startswith(self.inner.rstrip("/") + "/"):
            return self._from_source(image, key)
        try:
            from fsspec.core import url_to_fs

            fs, path = url_to_fs(image, **(self.so or {}))
            found = fs.exists(path)
        except (OSError, ValueError, ImportError) as e:
            raise _Skip("no image", f"the image '{image}' cannot be reached ({e})") from None
        if not found:
            raise _Skip("no image", f"the image '{image}' does not exist: check --images")
        return image

    def _keyed_images(self) -> dict[str, str]:
        if self._by_key is None:
            if self.images_root:
                from pipeline.data.sources import list_inputs

                rows = list_inputs(self.images_root, self.so)
                self._by_key = {r["key"]: r["path"] for r in rows if not r["error_stage"]}
            else:
                from pipeline.label.imports.cvat import image_names

                self._by_key = image_names(self.source.fs, self.inner)
        return self._by_key

    def _from_source(self, path: str, key: str) -> str:
        """An image inside the export: its URL, or for an archive a copy under OUTPUT/images/."""
        if not self.source.archive:
            return self.source.url_of(path)
        from pipeline.io.files import write_bytes_atomic

        self.copied_images = True
        url = f"{self.output}/images/{key}{posixpath.splitext(path)[1].lower()}"
        with self.source.fs.open(path, "rb") as f:
            write_bytes_atomic(url, f.read(), self.so)
        return url

    def _size(self, image: str) -> tuple[int, int]:
        try:
            return image_size(image, self.so)
        except Exception as e:  # not an image, truncated, unreachable: this image is left out
            raise _Skip("unreadable", f"the size of '{image}' cannot be read ({type(e).__name__}: {e})") from None


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message
