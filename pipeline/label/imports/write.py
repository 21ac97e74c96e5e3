"""From records to the labeled set's files: keys (once, in listing order), then per image in
worker threads its image (found, and its size read from its header, EXIF orientation applied),
its mask (composed by `common.compose`, or the format's raster) checked against that size, and
the mask PNG written atomically under OUTPUT/masks/.

An outcome is a dict: {key, name, image, mask, problems, message} for an imported image, or
{key, name, image, skip, message} for one left out (the reason is one of a few words the summary
counts: not annotated, no image, empty, unreadable, size mismatch, malformed, duplicate key,
bad key, bad reference).
"""

from __future__ import annotations

import posixpath
import threading
from typing import Iterator, Optional

from model.classes import ClassMap
from model.errors import DinosegError
from pipeline.label.imports.common import (
    MAX_MEMBER_BYTES,
    MAX_PIXELS,
    Record,
    compose,
    file_image_size,
    image_size,
    key_of,
)


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
        self._lock = threading.Lock()  # the workers share one listing of --images
        self.copied_images = False  # whether images were copied out of the archive into OUTPUT/images/

    def keyed(self, records: Iterator[Record]) -> Iterator[tuple[Record, str, Optional[tuple[str, str]]]]:
        """(record, key, skip) in listing order: keys are decided here, one thread, so the first
        image to take a key keeps it and a second one is a problem row. A record with nothing
        drawn takes no key (a second, annotated record of the same image keeps it)."""
        from pipeline.io.masks import check_key

        seen: set[str] = set()
        for record in records:
            try:
                key = check_key(record.key or key_of(record.name, self.images_root))
            except (DinosegError, ValueError) as e:
                yield record, "", ("bad key", f"'{record.name}': {e}")
                continue
            if not record.skip and not record.shapes and record.raster is None:
                why = "; ".join(record.notes) or "its annotation has no region"
                yield record, key, ("empty", f"{key}: nothing to learn from: {why}")
                continue
            if key in seen and not record.skip:
                message = f"'{record.name}' has the key '{key}' of an earlier image: it is left out"
                yield record, key, ("duplicate key", message)
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
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:  # a shape of the wrong kind
            return out | {
                "skip": "malformed",
                "message": f"{key}: the export's entry is malformed ({type(e).__name__}: {e})",
            }

    def _import(self, record: Record, key: str, out: dict) -> dict:
        image, size = self._image(record, key)
        out["image"] = image
        problems = list(record.notes)
        if record.raster is not None:
            try:
                mask, more = record.raster(self.classes)
            except Exception as e:  # a truncated or foreign file: this image is left out, never the run
                raise _Skip("unreadable", f"its mask cannot be read ({type(e).__name__}: {e})") from None
            if mask.shape != size:
                raise _Skip(
                    "size mismatch", f"the mask is {mask.shape[1]}x{mask.shape[0]}, its image {size[1]}x{size[0]}"
                )
        else:
            if record.size is not None and record.size != size:
                declared = f"{record.size[1]}x{record.size[0]}"
                raise _Skip(
                    "size mismatch", f"the export draws on a {declared} image, '{image}' is {size[1]}x{size[0]}"
                )
            mask, more = compose(record, self.classes, size, self.overlap, self.crowd)
        problems += more
        if not (mask != self.classes.ignore_index).any():
            why = "; ".join(problems) or "its annotation has no labeled pixel"
            raise _Skip("empty", f"nothing to learn from: {why}")
        from pipeline.io.files import write_bytes_atomic
        from pipeline.io.masks import encode_mask_png, mask_url

        if self.inner and image.startswith(self.inner.rstrip("/") + "/") and self.source.archive:
            image = out["image"] = self._copy_out(image, key)
        write_bytes_atomic(mask_url(self.output, key), encode_mask_png(mask, self.classes), self.so)
        message = f"{key}: " + "; ".join(problems) if problems else ""
        return out | {"mask": posixpath.join("masks", key + ".png"), "problems": problems, "message": message}

    def _image(self, record: Record, key: str) -> tuple[str, tuple[int, int]]:
        """(the image's URL, or its path inside the export; its (height, width) from its header)."""
        if record.raster is not None:  # CVAT names images by key: find the file
            image = self._keyed_images().get(key)
            if image is None:
                where = f"under '{self.images_root}'" if self.images_root else "in the export"
                raise _Skip("no image", f"no image with this key {where}: pass the images' folder with --images")
        elif record.image is None:
            raise _Skip("no image", f"'{record.name}' is a relative name: pass the folder it is under with --images")
        else:
            image = record.image
        if self.inner and image.startswith(self.inner.rstrip("/") + "/"):  # inside the export
            fs = self.source.fs
            try:
                found = fs.isfile(image)
                if found and self.source.archive and fs.info(image).get("size", 0) > MAX_MEMBER_BYTES:
                    raise _Skip("unreadable", f"'{image}' in the archive is over {MAX_MEMBER_BYTES >> 20} MiB")
                size = _size_of(lambda: file_image_size(fs, image)) if found else None
            except OSError as e:
                raise _Skip("no image", f"'{image}' cannot be read in the export ({e})") from None
            if size is None:
                raise _Skip("no image", f"the export has no image '{image}'")
            return (image if self.source.archive else self.source.url_of(image)), size
        try:
            return image, _size_of(lambda: image_size(image, self.so))
        except FileNotFoundError:
            raise _Skip("no image", f"the image '{image}' does not exist: check --images") from None
        except OSError as e:
            raise _Skip("no image", f"the image '{image}' cannot be reached ({e})") from None

    def _keyed_images(self) -> dict[str, str]:
        with self._lock:
            if self._by_key is None:
                if self.images_root:
                    from pipeline.data.sources import list_inputs

                    rows = list_inputs(self.images_root, self.so)
                    self._by_key = {r["key"]: r["path"] for r in rows if not r["error_stage"]}
                else:
                    from pipeline.label.imports.cvat import image_names

                    self._by_key = image_names(self.source.fs, self.inner)
            return self._by_key

    def _copy_out(self, path: str, key: str) -> str:
        """An image inside an archive, copied to OUTPUT/images/ (nothing outside can read it there)."""
        from pipeline.io.files import write_bytes_atomic

        self.copied_images = True
        url = f"{self.output}/images/{key}{posixpath.splitext(path)[1].lower()}"
        with self.source.fs.open(path, "rb") as f:
            write_bytes_atomic(url, f.read(), self.so)
        return url


def _size_of(read) -> tuple[int, int]:
    """(height, width) from `read()`, refused when it could not be a mask's."""
    try:
        h, w = read()
    except (FileNotFoundError, OSError):
        raise
    except Exception as e:  # not an image, truncated header
        raise _Skip("unreadable", f"the image's size cannot be read ({type(e).__name__}: {e})") from None
    if h * w > MAX_PIXELS or min(h, w) < 1:
        raise _Skip("unreadable", f"the image is {w}x{h}, over the {MAX_PIXELS:,}-pixel limit of a mask")
    return h, w


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message
