"""What a listed path becomes: its key, the URL its row holds, and the row itself. Shared by
folder listing (`pipeline.data.walk`, `pipeline.data.sources`) and manifests
(`pipeline.data.manifest`).

Keys. An input's key is its path relative to the INPUT root, without extension, '/'-separated;
its mask is OUTPUT/masks/<key>.png. Only '/' separates (and '\\' in local paths on Windows, where
it cannot be part of a name). Empty and '.' components are dropped (S3's `x//y.jpg` and
`x/./y.jpg` are objects of their own: the aliases this makes are caught as below). A name with a
backslash (possible on POSIX and object stores) is refused rather than kept or split: a key
must name one file on every disk OUTPUT may be copied to, and on Windows, in zip exports and
on SMB mounts a backslash is a separator (the mask writer refuses such keys too). A '..'
component, a NUL or a '::' (fsspec's URL chaining) make a path unsafe as well: it becomes a
`list` error row (UnsafePath), never a key.

Collisions. Files whose keys differ only by extension (a.jpg, a.png in one folder) all keep
their extension in the key ('a.jpg', 'a.png'), whatever order they are listed in, so adding a
third later can never hand its key to a file that already has a mask. Beyond that, a key is
unique over the whole listing under `fold_key`: the form in which two keys name the same file
on the most forgiving output disk (case-insensitive as macOS and Windows are, Unicode-normalising
as macOS is). A key already taken in that sense (`X/b` for `x/b`, an NFD 'é' for an NFC one, a
key that S3's `x//b.jpg` shares with `x/b.jpg`, the same path listed twice) makes the newcomer a
`list` error row naming both paths: nothing is silently overwritten, nothing is lost.

Stability. A re-run hands the listing what the earlier run recorded (`recorded_keys`: path ->
key from predictions/ and errors/): a recorded path keeps its key whatever siblings appeared
since, and no newcomer can take a recorded key, even one whose image is gone (its mask is there,
and resume goes by key). A path is compared by its `identity`, the form rows store: without a
URL's user-info or presigned query, which change from run to run. In a folder, the same file
relative to INPUT keeps its key too when INPUT is reached by another path (renamed, remounted,
through a link, OUTPUT copied along); pointing OUTPUT at another folder with the same relative
names therefore resumes them (give another OUTPUT, or --overwrite).
"""

from __future__ import annotations

import os
import re
import unicodedata
from functools import lru_cache

import fsspec
from fsspec.core import split_protocol

from model.errors import DinosegError
from model.redact import redact_url
from pipeline.data.schema import ERROR_FIELDS

# a backslash separates only in local paths on Windows (checked when called: tests flip it)
WINDOWS_LOCAL = os.name == "nt"
_BACKSLASH_OR_SLASH = re.compile(r"[\\/]")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")  # matched case-insensitively


# ---- keys ------------------------------------------------------------------------------------


def extension(name: str) -> str:
    return os.path.splitext(name)[1][1:].lower()


def is_image_name(name: str) -> bool:
    return extension(name) in IMAGE_EXTENSIONS


@lru_cache(maxsize=64)
def canonical_protocol(protocol: str | None) -> str:
    if protocol in (None, "", "file", "local"):
        return "file"
    try:
        p = fsspec.get_filesystem_class(protocol).protocol
        return p if isinstance(p, str) else p[0]
    except (ImportError, ValueError):
        return protocol


def split_url(url: str) -> tuple[str, list[str]]:
    """(canonical protocol, path components): '/' splits (and '\\' in local paths on Windows);
    empty and '.' parts are dropped."""
    protocol, path = split_protocol(url)
    protocol = canonical_protocol(protocol)
    if protocol in ("http", "https"):  # user-info and a query are credentials (presigned URLs), not names
        host, _, rest = path.partition("/")
        path = f"{host.rsplit('@', 1)[-1]}/{rest.split('#', 1)[0].split('?', 1)[0]}"
    parts = _BACKSLASH_OR_SLASH.split(path) if protocol == "file" and WINDOWS_LOCAL else path.split("/")
    return protocol, [c for c in parts if c not in ("", ".")]


def key_from_parts(rel: list[str], path: str, keep_extension: bool = False) -> str:
    if not rel:
        raise DinosegError(f"'{path}' names no file: list image files, not folders.")
    if any("\x00" in c or "::" in c for c in rel):
        raise DinosegError(f"'{path}' holds a NUL or '::', which cannot be part of an output name: rename the file.")
    if any("\\" in c for c in rel):
        raise DinosegError(
            f"'{path}' has a backslash in its name, which Windows, zip files and some mounts read as a folder "
            "separator (its mask could land on another's): rename the file."
        )
    if ".." in rel:
        raise DinosegError(
            f"'{path}' has a '..' component, so its mask could land outside OUTPUT: list it without '..'."
        )
    last = rel[-1] if keep_extension else os.path.splitext(rel[-1])[0]
    return "/".join(rel[:-1] + [last])


def make_key(root: str, path: str, keep_extension: bool = False) -> str:
    """The key of `path` under the INPUT `root`: relative, '/'-separated, without extension.

    `make_key('s3://b/in', 's3://b/in/x/y.jpg') == 'x/y'`; a single file is its own root
    (`make_key('/p/a.jpg', '/p/a.jpg') == 'a'`). With `keep_extension` the extension stays
    (the collision rule, see the module docstring). Raises DinosegError when `path` is not
    under `root` or cannot be made safe (a '..' component, a NUL, a '::').
    """
    root_protocol, root_parts = split_url(root)
    protocol, parts = split_url(path)
    if protocol == root_protocol and parts == root_parts:
        rel = parts[-1:]
    elif protocol == root_protocol and parts[: len(root_parts)] == root_parts:
        rel = parts[len(root_parts) :]
    else:
        raise DinosegError(f"'{path}' is not under the input root '{root}': list paths below it.")
    return key_from_parts(rel, path, keep_extension)


def fold_key(key: str) -> str:
    """`key` as the most forgiving output disk sees it: two keys with one fold are one file there.

    Backslashes are separators (Windows: keys hold none, but a fold never lets one
    through), empty and '.' components vanish, and case and Unicode
    normalisation are folded by Unicode's canonical caseless match, NFC(casefold(NFD(key))):
    what macOS (case-insensitive and normalisation-insensitive) and Windows (case-insensitive)
    equate. Canonical (NFC), not compatibility (NFKC), equivalence: no filesystem takes a
    superscript '²' for '2' or a full-width 'Ａ' for 'A', so folding those would refuse inputs that
    every disk keeps apart. Full case folding errs the other way on a few pairs ('ß' and 'ss'):
    a false alarm costs an error row that names both files, a miss would cost a mask.
    """
    parts = [c for c in _BACKSLASH_OR_SLASH.split(key) if c not in ("", ".")]
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", "/".join(parts)).casefold())


def is_safe_key(key: str) -> bool:
    """A key that lands under OUTPUT/masks on any disk (for keys read back from earlier runs)."""
    if not key or key.startswith("/") or any(c in key for c in ("\\", "\x00", "::")):
        return False
    return not any(c in ("", ".", "..") for c in key.split("/"))


def identity(path: str) -> str:
    """`path` as OUTPUT's rows hold it, the identity resume compares: without the credentials a URL
    may carry (user-info, a presigned query: `model.redact`), so that one object reached through
    another signature is the same input (DuplicateInput within a listing)."""
    return redact_url(path) if "@" in path or "?" in path else path


def relative_name(path: str, key: str) -> str:
    """The name relative to INPUT of the file an earlier run listed at `path` with `key`: the
    key's folders and the file's own name (what stays when INPUT is renamed or remounted)."""
    _, parts = split_url(path)
    return "/".join(key.split("/")[:-1] + parts[-1:])


def recorded_keys(output: str, storage_options: dict | None = None) -> dict[str, str]:
    """`identity(path)` -> key of every row an earlier run left in OUTPUT's predictions/ and
    errors/ parts (the key a re-run keeps for that path); a predicted row's key wins over an error
    row's. Parts hold paths redacted already; rows of older versions may not be."""
    from pipeline.io.parts import read_parts

    out: dict[str, str] = {}
    for folder in ("errors", "predictions"):
        table = read_parts(f"{output.rstrip('/')}/{folder}", ["path", "key"], storage_options)
        if table is not None:
            for path, key in zip(table["path"].to_pylist(), table["key"].to_pylist(), strict=True):
                if path and key:
                    out[identity(path)] = key
    return out


# ---- rows ------------------------------------------------------------------------------------


def input_row(path: str, key: str) -> dict:
    return {"path": path, "key": key, **dict.fromkeys(ERROR_FIELDS, "")}


def list_error_row(path: str, message: str, error_type: str) -> dict:
    return {"path": path, "key": "", "error_stage": "list", "error_type": error_type, "error_message": message}


def is_local(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols


def row_url(fs, path: str) -> str:
    """`path` as rows hold it: a URL fsspec opens with the same storage_options; local files as
    absolute local paths."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def __getattr__(name: str):
    """`KeyRegistry`, the keys given out in one listing by the rules above, lives in
    `pipeline.data.registry`; it is still importable from here."""
    if name == "KeyRegistry":
        from pipeline.data.registry import KeyRegistry

        return KeyRegistry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
