"""Where rows come from: list the inputs under a URL or in a manifest, read their bytes, decode.

Listing runs on the driver and streams; `ReadBytes` and `Decode` are numpy-batch callables
(`__init__(config)`, `__call__(batch) -> batch`) that run as they are in a unit test and as
`map_batches` classes in Ray Data. A row that fails keeps flowing with its error fields set.

Keys. An input's key is its path relative to the INPUT root, without extension, '/'-separated;
its mask is OUTPUT/masks/<key>.png. Backslashes count as separators (Windows-style manifests),
empty and '.' components are dropped; a '..' component, a NUL or a '::' (fsspec's URL chaining)
make the path unsafe: it becomes a `list` error row, never a key.

Collisions. Files whose keys differ only by extension (a.jpg, a.png in one folder) all keep
their extension in the key ('a.jpg', 'a.png'), whatever order they are listed in, so adding a
third later can never hand its key to a file that already has a mask. If a key is still taken
(a manifest that lists the same path twice; 'a.jpg' next to a file named 'a.jpg.png'; the same
path under two buckets in one manifest), the plain key wins, else the first listed, and the
other input becomes a `list` error row: nothing is silently overwritten, nothing is lost.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import posixpath
import re
from array import array
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import Iterator

import fsspec
import numpy as np
from PIL import Image
from fsspec.core import split_protocol, url_to_fs
from fsspec.utils import glob_translate

from model.errors import DinosegError

from .schema import ERROR_FIELDS, empty_errors, failed, object_array, set_error

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")  # matched case-insensitively
MANIFEST_EXTENSIONS = ("txt", "csv", "parquet")
_GLOB_CHARS = re.compile(r"[*?\[]")
_SEPARATORS = re.compile(r"[\\/]")


def _ext(name: str) -> str:
    return os.path.splitext(name)[1][1:].lower()


def is_image_name(name: str) -> bool:
    return _ext(name) in IMAGE_EXTENSIONS


def _extensions() -> str:
    return ", ".join(IMAGE_EXTENSIONS)


# ---- keys ------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _canonical_protocol(protocol: str | None) -> str:
    if protocol in (None, "", "file", "local"):
        return "file"
    try:
        p = fsspec.get_filesystem_class(protocol).protocol
        return p if isinstance(p, str) else p[0]
    except (ImportError, ValueError):
        return protocol


def _split(url: str) -> tuple[str, list[str]]:
    """(canonical protocol, path components): backslashes split, empty and '.' parts dropped."""
    protocol, path = split_protocol(url)
    return _canonical_protocol(protocol), [c for c in _SEPARATORS.split(path) if c not in ("", ".")]


def _key_from_parts(rel: list[str], path: str, keep_extension: bool = False) -> str:
    if not rel:
        raise DinosegError(f"'{path}' names no file: list image files, not folders.")
    for c in rel:
        if c == "..":
            raise DinosegError(f"'{path}' has a '..' component, so its mask could land outside OUTPUT: list it without '..'.")
        if "\x00" in c or "::" in c:
            raise DinosegError(f"'{path}' holds a NUL or '::', which cannot be part of an output name: rename the file.")
    last = rel[-1] if keep_extension else os.path.splitext(rel[-1])[0]
    return "/".join(rel[:-1] + [last])


def make_key(root: str, path: str, keep_extension: bool = False) -> str:
    """The key of `path` under the INPUT `root`: relative, '/'-separated, without extension.

    `make_key('s3://b/in', 's3://b/in/x/y.jpg') == 'x/y'`; a single file is its own root
    (`make_key('/p/a.jpg', '/p/a.jpg') == 'a'`). With `keep_extension` the extension stays
    (the collision rule, see the module docstring). Raises DinosegError when `path` is not
    under `root` or cannot be made safe (a '..' component, a NUL, a '::').
    """
    root_protocol, root_parts = _split(root)
    protocol, parts = _split(path)
    if protocol == root_protocol and parts == root_parts:
        rel = parts[-1:]
    elif protocol == root_protocol and parts[: len(root_parts)] == root_parts:
        rel = parts[len(root_parts):]
    else:
        raise DinosegError(f"'{path}' is not under the input root '{root}': list paths below it.")
    return _key_from_parts(rel, path, keep_extension)


def _row(path: str, key: str) -> dict:
    return {"path": path, "key": key, **{f: "" for f in ERROR_FIELDS}}


def _error_row(path: str, message: str, error_type: str) -> dict:
    return {"path": path, "key": "", "error_stage": "list", "error_type": error_type, "error_message": message}


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "little")


# ---- listing ---------------------------------------------------------------------------------


def list_inputs(input: str, storage_options: dict | None = None) -> Iterator[dict]:
    """Yield one row {path, key, error_stage, error_type, error_message} per input, lazily.

    INPUT is a folder or prefix (local, or any fsspec URL), a glob (`*`, `?`, `[`; only when
    no file or folder has that literal name), a manifest (.txt: one path or URL a line, blank
    lines and '#' comments skipped; .csv or .parquet: a `path` column), or one image file.
    Folders are walked recursively, one directory at a time, files sorted within each
    directory and subdirectories visited in sorted order; only names with an extension in
    IMAGE_EXTENSIONS (any case) are kept. A glob's key root is its folder before the first
    wildcard; a folder that matches the glob is taken whole.

    Manifests keep their order and are not filtered (what is listed is an input, and a file
    that is missing or not an image becomes a read or decode error). An entry without a
    protocol is relative to the manifest's folder. Keys are relative to the longest common
    folder of all entries (a one-line manifest gives the file's stem); entries on different
    filesystems have none, so their key is the path without its scheme. The manifest is read
    twice, to find that folder and the collisions without holding its paths in memory.

    Rows hold full URLs that fsspec opens with the same storage_options ('s3://b/x.jpg';
    local files as absolute local paths). Raises DinosegError (when iteration starts) if
    INPUT does not exist, and (at the end) if it holds no images. Unsafe or colliding paths
    come out as rows with error_stage 'list' (see the module docstring).
    """
    options = dict(storage_options or {})
    try:
        fs, path = url_to_fs(input, **options)
    except (ImportError, ValueError) as e:
        raise DinosegError(f"cannot open '{input}': {e}: check the URL, its scheme and the storage options.") from None
    path = path.rstrip("/") or fs.root_marker or "/"
    kind = _input_kind(fs, path, input)
    if kind == "dir":
        rows = _walk_rows(fs, path, path)
        nothing = f"'{input}' holds no images with extensions {_extensions()}: check the prefix."
    elif kind == "glob":
        rows = _glob_rows(fs, path, input)
        nothing = f"'{input}' matches no images with extensions {_extensions()}: check the pattern."
    elif kind == "manifest":
        rows = _manifest_rows(fs, path, input)
        nothing = f"the manifest '{input}' lists no paths: check the file."
    else:
        rows = iter([_row(_url(fs, path), make_key(path, path))])
        nothing = ""
    n = 0
    for row in rows:
        n += 1
        yield row
    if n == 0:
        raise DinosegError(nothing)


def _is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


def _url(fs, path: str) -> str:
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _input_kind(fs, path: str, input: str) -> str:
    try:
        if fs.isdir(path):
            return "dir"
        if fs.isfile(path):
            ext = _ext(path)
            if ext in MANIFEST_EXTENSIONS:
                return "manifest"
            if ext in IMAGE_EXTENSIONS:
                return "file"
            raise DinosegError(
                f"'{input}' is neither an image ({_extensions()}) nor a manifest (.txt, .csv, .parquet): "
                "pass a folder, a glob, a manifest or an image."
            )
    except PermissionError as e:
        raise DinosegError(f"access to '{input}' was denied ({e}): check the credentials and storage options.") from None
    except (OSError, ValueError) as e:  # FileNotFoundError is an OSError: a missing bucket says so here
        if not isinstance(e, FileNotFoundError):
            raise DinosegError(f"cannot look at '{input}' ({e}): check the URL and the storage options.") from None
    if _GLOB_CHARS.search(path):
        return "glob"
    raise DinosegError(f"the input '{input}' does not exist: check the path.")


def _walk_rows(fs, walk_root: str, key_root: str, dir_wanted=None, file_wanted=None) -> Iterator[dict]:
    """Walk `walk_root` one directory listing at a time, keyed relative to `key_root`: a folder's
    files (sorted), then its subfolders (sorted, depth first). `dir_wanted(path)` prunes
    subfolders; `file_wanted(dirpath)` returns a predicate over a file's full path.

    Not `fs.walk`: it drops its `on_error` when it recurses, so an unreadable subfolder would
    vanish without a word; here it becomes a `list` error row."""
    _, root_parts = _split(key_root)
    stack = [walk_root]
    while stack:
        folder = stack.pop()
        try:
            listing = fs.ls(folder, detail=True)
        except OSError as e:
            if folder == walk_root:
                raise DinosegError(f"cannot list '{_url(fs, folder)}' ({e}): check the path and the permissions.") from None
            where = _url(fs, folder)
            message = f"the folder '{where}' could not be listed ({e}): its images are missing from this run; check its permissions."
            yield _error_row(where, message, type(e).__name__)
            continue
        fs.invalidate_cache(folder)  # s3fs would keep every listing: memory would grow with the bucket
        dirs, files = [], []
        for info in listing:
            name = info["name"].rstrip("/")
            if name != folder:  # an object store's folder placeholder lists itself
                (dirs if info["type"] == "directory" else files).append(name)
        keep = file_wanted(folder) if file_wanted is not None else None
        paths = [p for p in sorted(files) if is_image_name(p) and (keep is None or keep(p))]
        yield from _folder_rows(fs, paths, root_parts)
        stack.extend(d for d in sorted(dirs, reverse=True) if dir_wanted is None or dir_wanted(d))


def _folder_rows(fs, paths: list[str], root_parts: list[str]) -> Iterator[dict]:
    """Rows for one folder's files, applying the collision rule within the folder."""
    items = []
    for p in paths:
        url, rel = _url(fs, p), _split(p)[1][len(root_parts):]
        try:
            items.append((url, rel, _key_from_parts(rel, url)))
        except DinosegError as e:
            items.append((url, rel, e))
    counts: dict[str, int] = {}
    for _, _, key in items:
        if isinstance(key, str):
            counts[key] = counts.get(key, 0) + 1
    plain = {k for k, n in counts.items() if n == 1}
    taken: set[str] = set()
    for url, rel, key in items:
        if isinstance(key, DinosegError):
            yield _error_row(url, str(key), "UnsafePath")
            continue
        if counts[key] > 1:
            key = _key_from_parts(rel, url, keep_extension=True)
            if key in plain or key in taken:
                yield _error_row(url, f"its key '{key}' is already used by another file in its folder: rename one of them.", "KeyCollision")
                continue
        taken.add(key)
        yield _row(url, key)


def _glob_rows(fs, pattern: str, input: str) -> Iterator[dict]:
    parts = pattern.split("/")
    first = next(i for i, c in enumerate(parts) if _GLOB_CHARS.search(c))
    root = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else "")
    if not root or not fs.exists(root):
        raise DinosegError(f"the input '{input}' does not exist: check the path (the part before the first wildcard must exist).")
    wild = parts[first:]
    regex = re.compile(glob_translate(pattern))

    def dir_wanted(path: str) -> bool:  # could anything below `path` match?
        for i, c in enumerate(path.split("/")[first:]):
            if i >= len(wild) or wild[i] == "**":
                return True
            if not fnmatchcase(c, wild[i]):
                return False
        return True

    def file_wanted(dirpath: str):
        comps = dirpath.split("/")
        whole = any(regex.match("/".join(comps[:i])) for i in range(first + 1, len(comps) + 1))
        return (lambda p: True) if whole else (lambda p: regex.match(p) is not None)

    return _walk_rows(fs, root, root, dir_wanted, file_wanted)


# ---- manifests -------------------------------------------------------------------------------


def _manifest_lines(fs, path: str, input: str) -> Iterator[str]:
    ext = _ext(path)
    try:
        if ext == "txt":
            with fs.open(path, "rt", encoding="utf-8-sig") as f:
                for line in f:
                    line = line.strip()
                    if line and not line.startswith("#"):
                        yield line
            return
        with fs.open(path, "rb") as f:
            if ext == "csv":
                import pyarrow as pa
                import pyarrow.csv as pacsv

                opts = pacsv.ConvertOptions(include_columns=["path"], column_types={"path": pa.string()})
                try:
                    batches = pacsv.open_csv(f, convert_options=opts)
                except (pa.ArrowInvalid, pa.ArrowKeyError) as e:
                    if "include_columns" not in str(e):
                        raise
                    batches = None
            else:
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(f)
                batches = pf.iter_batches(columns=["path"], batch_size=65536) if "path" in pf.schema_arrow.names else None
            if batches is None:
                raise DinosegError(f"the manifest '{input}' has no 'path' column: name the column of image paths 'path'.")
            for batch in batches:
                for value in batch.column(0).to_pylist():
                    if value and value.strip():
                        yield value.strip()
    except (OSError, ValueError, KeyError) as e:  # pyarrow's errors are ValueErrors and KeyErrors
        raise DinosegError(f"cannot read the manifest '{input}' ({type(e).__name__}: {e}): check that it is a valid .{ext} file.") from None


def _resolve(entry: str, fs, folder: str) -> tuple[str, str, list[str]]:
    """A manifest entry -> (URL to read, canonical protocol, path components)."""
    protocol, rest = split_protocol(entry)
    if protocol is None and _is_local(fs):  # relative to the manifest's folder, like a link in a page
        url = os.path.normpath(os.path.join(folder, entry))
    elif protocol is None:  # ... and '/x' is relative to the manifest's filesystem: its bucket list
        joined = fs.root_marker + entry.lstrip("/") if entry.startswith("/") else posixpath.join(folder, entry)
        url = fs.unstrip_protocol(posixpath.normpath(joined))
    elif _canonical_protocol(protocol) == "file":
        url = os.path.abspath(rest)  # the OS resolves '..' in local paths anyway
    else:
        url = entry  # kept literally: on an object store 'a/../b' is a name, not a path
    protocol, parts = _split(url)
    return url, protocol, parts


def _manifest_rows(fs, path: str, input: str) -> Iterator[dict]:
    folder = path.rsplit("/", 1)[0] if "/" in path else ""
    # pass 1: the common folder and the stem-key hashes (8 bytes an entry), to find collisions
    protocols: set[str] = set()
    prefix: list[str] | None = None
    stems = array("Q")
    for entry in _manifest_lines(fs, path, input):
        _, protocol, parts = _resolve(entry, fs, folder)
        protocols.add(protocol)
        dirs = parts[:-1]
        if prefix is None:
            prefix = dirs
        else:
            n = 0
            while n < min(len(prefix), len(dirs)) and prefix[n] == dirs[n]:
                n += 1
            del prefix[n:]
        stems.append(_hash("/".join(dirs + [os.path.splitext(parts[-1])[0]])) if parts else 0)
    if prefix is None:
        return
    root = prefix if len(protocols) == 1 else []
    sorted_stems = np.sort(np.frombuffer(stems, dtype=np.uint64)) if len(stems) else np.zeros(0, np.uint64)
    repeated = sorted_stems[1:][sorted_stems[1:] == sorted_stems[:-1]]
    colliding = {int(h) for h in np.unique(repeated)}
    del stems

    def is_stem(h: int) -> bool:
        i = np.searchsorted(sorted_stems, np.uint64(h))
        return i < len(sorted_stems) and int(sorted_stems[i]) == h

    # pass 2: the rows; only colliding entries are remembered
    taken: dict[str, str] = {}
    seen: set[str] = set()
    for entry in _manifest_lines(fs, path, input):
        url, _, parts = _resolve(entry, fs, folder)
        rel = parts[len(root):]
        try:
            key = _key_from_parts(rel, url)
        except DinosegError as e:
            yield _error_row(url, str(e), "UnsafePath")
            continue
        if _hash("/".join(parts[:-1] + [os.path.splitext(parts[-1])[0]])) in colliding:
            if url in seen:
                message = f"'{url}' is listed more than once in the manifest: only its first line is processed."
                yield _error_row(url, message, "DuplicateInput")
                continue
            seen.add(url)
            key = _key_from_parts(rel, url, keep_extension=True)
            h = _hash("/".join(parts))
            other = taken.get(key)
            if other is not None or (is_stem(h) and h not in colliding):
                by = f"'{other}'" if other else "another entry"
                yield _error_row(url, f"its key '{key}' is already used by {by}: rename one of them or list only one.", "KeyCollision")
                continue
            taken[key] = url
        yield _row(url, key)


# ---- reading ---------------------------------------------------------------------------------


class ReadBytes:
    """Batch {path, key, error_*} -> + `bytes` (b'' where the row failed); failures -> 'read'.

    Paths are grouped by filesystem and fetched with `cat_ranges`, concurrent on object
    stores (s3fs, gcsfs, http), with per-path exceptions instead of one failure for all.
    (`fs.cat` of a list would expand glob characters in file names, so it is not used.)
    """

    def __init__(self, storage_options: dict | None = None):
        self.storage_options = dict(storage_options or {})
        self._filesystems: dict[str, object] = {}

    def _fs(self, protocol: str):
        if protocol not in self._filesystems:
            options = {} if protocol == "file" else self.storage_options
            self._filesystems[protocol] = fsspec.filesystem(protocol, **options)
        return self._filesystems[protocol]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = _with_error_columns(batch)
        n = len(out["path"])
        data: list[bytes] = [b""] * n
        bad = failed(out)
        groups: dict[str, list[int]] = {}
        for i in range(n):
            if not bad[i]:
                groups.setdefault(_canonical_protocol(split_protocol(str(out["path"][i]))[0]), []).append(i)
        for protocol, rows in groups.items():
            paths = [str(out["path"][i]) for i in rows]
            try:
                results = self._fs(protocol).cat_ranges(paths, None, None, on_error="return")
            except Exception as e:  # the filesystem itself failed (bad options, no driver)
                results = [e] * len(rows)
            for i, path, result in zip(rows, paths, results):
                if isinstance(result, BaseException):
                    set_error(out, i, "read", _read_message(path, result), type(result).__name__)
                else:
                    data[i] = bytes(result)
        out["bytes"] = object_array(data)
        return out


def _read_message(path: str, e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return f"cannot read '{path}': it does not exist (deleted or moved after listing?)."
    if isinstance(e, PermissionError):
        return f"cannot read '{path}': access denied ({e}); check the credentials and storage options."
    if isinstance(e, IsADirectoryError):
        return f"cannot read '{path}': it is a folder, not a file."
    return f"cannot read '{path}': {type(e).__name__}: {e}."


def _with_error_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A shallow copy whose error columns are fresh, writable object arrays (Ray's may be read-only
    or fixed-width strings that would truncate a message)."""
    out = dict(batch)
    n = len(out["path"])
    for field, fresh in empty_errors(n).items():
        if field in out:
            fresh[:] = [str(v) if v is not None else "" for v in out[field]]
        out[field] = fresh
    return out


# ---- decoding --------------------------------------------------------------------------------


class DecodeError(DinosegError):
    """An input's bytes are not an image we can decode; the message names the problem."""


@dataclass(frozen=True)
class DecodeConfig:
    max_megapixels: float = 100.0  # decompression-bomb limit (a 50 MP photo passes)
    shrink_to: int | None = None  # shrink so the short side is this (never upscale); None: keep

    def validate(self) -> "DecodeConfig":
        if not self.max_megapixels > 0:
            raise DinosegError(f"--max-megapixels {self.max_megapixels} must be positive, e.g. 100.")
        if self.shrink_to is not None and self.shrink_to < 1:
            raise DinosegError(f"shrink_to {self.shrink_to} must be a positive number of pixels, or None.")
        return self


PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")  # JPEG includes MPO; never EPS (runs Ghostscript)
BACKGROUND = (255, 255, 255)  # what transparent pixels become: white, as viewers and web pages show them
_HIGH_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ORIENTATION = 0x0112
_TRANSPOSE = {  # EXIF orientation -> the transpose that displays it upright (as ImageOps.exif_transpose)
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def check_pixels(width: int, height: int, max_megapixels: float) -> None:
    """Raise DecodeError if width x height is over the limit (1 megapixel = 10**6 pixels)."""
    if width * height > max_megapixels * 1e6:
        raise DecodeError(
            f"the image is {width}x{height} ({width * height / 1e6:.1f} megapixels), over the limit of "
            f"{max_megapixels:g} megapixels: raise --max-megapixels if the file is trusted."
        )


def _take_over_pil_bomb_check() -> None:
    # PIL's guard is one process-wide number checked inside Image.open (a warning above 89.5 MP,
    # an error above 179 MP), before we can compare the size with our per-call limit: it would
    # warn on or reject images our limit accepts. Setting it per call would race between threads,
    # so it is switched off once, never toggled back, and `check_pixels` does the job on every
    # call, after Image.open has parsed the header and before any pixel buffer exists.
    if Image.MAX_IMAGE_PIXELS is not None:
        Image.MAX_IMAGE_PIXELS = None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """A WebP canvas size from its header: PIL's WebP decoder allocates it inside Image.open."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def decode_image(data: bytes, config: DecodeConfig | None = None) -> tuple[np.ndarray, int, int]:
    """Bytes -> (RGB uint8 array (h, w, 3), width, height), or DecodeError with one sentence.

    width and height are the original size after EXIF orientation: the mask's size. The array
    is that size too, unless `config.shrink_to` shrank it (JPEGs first by DCT scaling in
    `draft`, then an antialiased resize to short side `shrink_to`). Conversions: EXIF
    orientation applied; transparency (RGBA, LA, PA, P or L/RGB with a transparent colour)
    composited on white; 16-bit (I;16*, and I taken as 16-bit, clipped to 0..65535) scaled by
    1/257 with rounding; F: values in [0, 1] times 255, anything else stretched from its
    min..max; 1, L, P, CMYK, YCbCr converted by PIL. Truncated files are errors, never a grey
    half (PIL's LOAD_TRUNCATED_IMAGES is left off). Only JPEG/MPO, PNG, WebP, BMP and TIFF
    are opened, whatever the name says.
    """
    config = config or DecodeConfig()
    if not data:
        raise DecodeError("the file is empty (0 bytes).")
    _take_over_pil_bomb_check()
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and (size := _webp_size(data)):
        check_pixels(*size, config.max_megapixels)
    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
    except Exception as e:
        claimed = _signature(data)
        if isinstance(e, Image.UnidentifiedImageError) and not claimed:
            raise DecodeError(f"the file is not a JPEG, PNG, WebP, BMP or TIFF image (it starts with {bytes(data[:16])!r}).") from None
        raise DecodeError(f"the {claimed or 'image'} header is truncated or corrupt ({type(e).__name__}: {e}).") from None
    with img:
        w0, h0 = img.size
        check_pixels(w0, h0, config.max_megapixels)  # before load(): nothing is allocated yet
        try:
            target = config.shrink_to
            if target and min(w0, h0) >= 2 * target:  # JPEG: decode at 1/2, 1/4 or 1/8, never below target
                s = target / min(w0, h0)
                img.draft(img.mode, (math.ceil(w0 * s), math.ceil(h0 * s)))
            img.load()
            orientation = _orientation(img)
            out = img.transpose(_TRANSPOSE[orientation]) if orientation in _TRANSPOSE else img
            out = _shrink(_to_rgb(out), target)
            rgb = np.asarray(out)
        except DinosegError:
            raise
        except MemoryError:
            raise DecodeError(
                f"not enough memory to decode a {w0}x{h0} image: lower --max-megapixels or give the task more memory."
            ) from None
        except Exception as e:
            raise DecodeError(_corrupt_message(e)) from None
    width, height = (h0, w0) if orientation in (5, 6, 7, 8) else (w0, h0)
    return rgb, width, height


def _signature(data: bytes) -> str:
    """The format the first bytes claim, for a clearer message when PIL cannot open the file."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return "BMP" if data[:2] == b"BM" else ""


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_ORIENTATION, 1)
        return value if isinstance(value, int) else 1
    except Exception:  # broken EXIF is not a broken image: keep it as stored
        log.debug("unreadable EXIF, orientation ignored", exc_info=True)
        return 1


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in _HIGH_DEPTH:
        a = np.asarray(img)
        if a.dtype.kind == "i":  # mode I: taken as 16-bit data (what 16-bit PNG/TIFF open as)
            a = np.clip(a, 0, 65535)
        gray = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        finite = np.isfinite(a)
        lo, hi = (float(a[finite].min()), float(a[finite].max())) if finite.any() else (0.0, 1.0)
        scaled = a * 255 if lo >= 0 and hi <= 1 else (a - lo) * (255 / (hi - lo) if hi > lo else 0)
        return Image.fromarray(np.where(finite, np.clip(np.rint(scaled), 0, 255), 0).astype(np.uint8)).convert("RGB")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", img.size, BACKGROUND + (255,)), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")  # ValueError for a mode PIL cannot convert


def _shrink(img: Image.Image, target: int | None) -> Image.Image:
    w, h = img.size
    if not target or min(w, h) <= target:
        return img
    size = (target, max(target, round(h * target / w))) if w <= h else (max(target, round(w * target / h)), target)
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _corrupt_message(e: Exception) -> str:
    text = str(e)
    if "truncated" in text.lower() or isinstance(e, EOFError):
        return f"the image data is truncated ({text or type(e).__name__}): the file is incomplete; copy it again."
    return f"the image data is corrupt ({type(e).__name__}: {text})."


class Decode:
    """Batch with `bytes` -> without it, + `image` (object array of (h, w, 3) uint8; (0, 0, 3)
    for failed rows), `width`, `height` (int64, the original size; 0 for failed rows).
    Failures -> error_stage 'decode'; rows that failed earlier pass through untouched."""

    def __init__(self, config: DecodeConfig | None = None):
        self.config = (config or DecodeConfig()).validate()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = _with_error_columns(batch)
        data = out.pop("bytes")
        n = len(data)
        images = [np.zeros((0, 0, 3), np.uint8) for _ in range(n)]
        widths, heights = np.zeros(n, np.int64), np.zeros(n, np.int64)
        bad = failed(out)
        for i in range(n):
            if bad[i]:
                continue
            try:
                images[i], widths[i], heights[i] = decode_image(data[i], self.config)
            except DinosegError as e:
                set_error(out, i, "decode", e)
            except Exception as e:  # a bug in a codec must cost one row, not the batch
                set_error(out, i, "decode", f"could not decode the image ({type(e).__name__}: {e}).", type(e).__name__)
        out["image"], out["width"], out["height"] = object_array(images), widths, heights
        return out
