"""Manifests: the inputs listed in a .txt (one path or URL a line), .csv or .parquet (a `path`
column) file, as rows in the manifest's order (`list_inputs` in `pipeline.data.sources` says what a
manifest may hold; `pipeline.data.keys` the key and collision rules). No listed file is looked at.

The manifest is read once, in batches: each entry resolved to the URL its row holds (in Arrow for
plain local paths and object-store URLs, one by one for the rest: `_resolve`), spooled
(`pipeline.data.spool`) with the 8-byte hash of its folded stem key, while the common folder of
all entries is found (the longest common prefix of a set of strings is that of its least and its
greatest). Then the stems shared by two URLs are known (those entries keep their extension) and
`Manifest.proposals` gives each entry's row proposal (`pipeline.data.claims`), whose keys the
listing makes unique (the same URL twice is a DuplicateInput row). Keys depend on the common
folder, so a new entry elsewhere would change them: what makes them stable across runs is the
earlier run's record (`recorded_keys`), which the registry keeps (by URL without credentials, or
by the name relative to the common folder when the entries moved).
"""

from __future__ import annotations

import os
import posixpath
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import split_protocol

from model.errors import DinosegError
from pipeline.data.claims import PROPOSAL, UNSAFE, claim_entry, parts_of
from pipeline.data.keys import canonical_protocol, extension, is_local, key_from_parts, split_url
from pipeline.data.recorded import Column
from pipeline.data.registry import KeyRegistry
from pipeline.data.spool import Spool
from pipeline.data.strings import (
    Bytes,
    any_byte,
    byte_slice,
    cut_prefix,
    fold_keys,
    hashes,
    matches,
    strip_extensions,
    stripped,
    unplain,
)
from pipeline.data.walk import storage_fault

MANIFEST_EXTENSIONS = ("txt", "csv", "parquet")
_LINES_BYTES = 1 << 20  # a .txt manifest is read about this much at a time
# an entry's URL, its path parts joined, the same without extension, and that folded's hash
SPOOLED = pa.schema([("path", pa.string()), ("full", pa.string()), ("stem", pa.string()), ("stem_hash", pa.int64())])


def _manifest_batches(fs, path: str, input: str) -> Iterator[pa.Array]:
    """The manifest's entries, stripped, in order, as string arrays."""
    ext = extension(path)
    try:
        if ext == "txt":
            # text mode turns '\r\n' and '\r' into '\n': the chunk's lines are what iterating gives
            with fs.open(path, "rt", encoding="utf-8-sig") as f:
                rest = ""
                while chunk := f.read(_LINES_BYTES):
                    whole, _, rest = (rest + chunk).rpartition("\n")
                    yield from _kept_lines(whole, comments=True)
                yield from _kept_lines(rest, comments=True)
            return
        with fs.open(path, "rb") as f:
            if ext == "csv":
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
                batches = (
                    pf.iter_batches(columns=["path"], batch_size=65536) if "path" in pf.schema_arrow.names else None
                )
            if batches is None:
                raise DinosegError(
                    f"the manifest '{input}' has no 'path' column: name the column of image paths 'path'."
                )
            for batch in batches:
                yield from _kept_lines(batch.column(0).cast(pa.string()))
    except (OSError, ValueError, KeyError) as e:  # pyarrow's errors are ValueErrors and KeyErrors
        raise DinosegError(
            f"cannot read the manifest '{input}' ({type(e).__name__}: {e}): check that it is a valid .{ext} file."
        ) from None
    except Exception as e:  # botocore's EndpointConnectionError and kin are no OSError
        if storage_fault(e) is None:
            raise
        raise DinosegError(
            f"cannot read the manifest '{input}' ({type(e).__name__}: {e}): check the endpoint, then run again."
        ) from None


def _kept_lines(text: str | pa.Array, comments: bool = False) -> Iterator[pa.Array]:
    """The stripped lines of `text` (or the stripped strings of an array) that are not blank
    (nor, with `comments`, '#' comments)."""
    if isinstance(text, str):
        if not text:
            return
        text = pc.split_pattern(pa.array([text], pa.string()), "\n").flatten()
    lines = stripped(text)
    kept = pc.fill_null(pc.greater(pc.utf8_length(lines), 0), False)
    if comments:
        kept = pc.and_(kept, pc.invert(pc.starts_with(lines, "#")))
    lines = lines.filter(kept)
    if len(lines):
        yield lines


def _resolve(entry: str, fs, folder: str) -> tuple[str, str, list[str]]:
    """A manifest entry -> (URL to read, canonical protocol, path components)."""
    protocol, rest = split_protocol(entry)
    if protocol is None and is_local(fs):  # relative to the manifest's folder, like a link in a page
        url = os.path.normpath(os.path.join(folder, entry))
    elif protocol is None:  # ... and '/x' is relative to the manifest's filesystem: its bucket list
        joined = fs.root_marker + entry.lstrip("/") if entry.startswith("/") else posixpath.join(folder, entry)
        url = fs.unstrip_protocol(posixpath.normpath(joined))
    elif canonical_protocol(protocol) == "file":
        url = os.path.abspath(rest)  # the OS resolves '..' in local paths anyway
    else:
        url = entry  # kept literally: on an object store 'a/../b' is a name, not a path
    protocol, parts = split_url(url)
    return url, protocol, parts


class _Resolver:
    """`_resolve` over an array of entries: (URLs, canonical protocols, '/'.join(components))."""

    def __init__(self, fs, folder: str):
        from pipeline.data.keys import WINDOWS_LOCAL

        self.fs, self.folder, self.local = fs, folder, is_local(fs)
        self.windows = WINDOWS_LOCAL
        self.base = None  # what a plain relative entry is appended to, when that is all resolving does
        if self.local and not WINDOWS_LOCAL and folder.startswith("/") and not folder.startswith("//"):
            norm = os.path.normpath(folder)
            self.base = norm.rstrip("/") + "/"
        elif not self.local and folder and posixpath.normpath(folder) == folder:
            probe = f"{folder}/q/r"
            url = fs.unstrip_protocol(probe)
            if url.endswith(probe):
                self.base = url[: -len("q/r")]
        self._protocols: dict[str, str] = {}

    def __call__(self, entries: pa.Array) -> tuple[pa.Array, np.ndarray, pa.Array, np.ndarray]:
        """(URLs, protocols, '/'-joined parts, which of those are plain: no empty or '.' part)."""
        found = pc.find_substring(entries, "://").to_numpy(zero_copy_only=False)
        scheme = found > 1  # 'c://' names a drive
        fast = scheme.copy()  # an object-store URL is kept as it is
        urls = entries
        relative = ~scheme
        if self.base is not None and relative.any():
            relative &= ~matches(entries, r"^data:")
            joined = relative & ~unplain(entries, dots=True)
            fast |= joined
            if self.local:  # an absolute path that normpath leaves as it is
                fast |= relative & matches(entries, r"^/") & ~unplain(pc.utf8_slice_codeunits(entries, 1), dots=True)
            urls = pc.if_else(pa.array(joined), pc.binary_join_element_wise(self.base, entries, ""), entries)
        # split_url: the scheme, then the '/'-parts of what follows (one leading '/' dropped)
        at = found if urls is entries else pc.find_substring(urls, "://").to_numpy(zero_copy_only=False)
        scheme = at > 1
        if not scheme.any():  # local paths
            protocols, after = self._canonical(pa.repeat(pa.scalar("", pa.string()), len(urls))), urls
        elif scheme.all() and (at == at[0]).all():  # one scheme for all (its name is ASCII)
            protocols = self._canonical(byte_slice(urls, 0, int(at[0])))
            after = byte_slice(urls, int(at[0]) + 3)
        else:
            b = Bytes(urls)
            protocols = self._canonical(b.slice(b.starts, np.where(scheme, b.starts + at, b.starts)))
            after = b.slice(np.where(scheme, b.starts + at + 3, b.starts), b.ends)
        lead = pc.fill_null(pc.starts_with(after, "/"), False)
        leading = pc.sum(lead).as_py() or 0
        if leading == 0:
            full = after
        elif leading == len(after):  # one '/' dropped from all
            full = byte_slice(after, 1)
        else:
            a = Bytes(after)
            full = a.slice(a.starts + lead.to_numpy(zero_copy_only=False), a.ends)
        plain = ~unplain(full)
        fast &= plain
        fast &= ~np.isin(protocols, ["http", "https"])  # user-info and queries are no names
        fast &= ~((protocols == "file") & (scheme | bool(self.windows)))  # made absolute by the OS
        if fast.all():
            return urls, protocols, full, plain
        slow = np.flatnonzero(~fast)
        resolved = [_resolve(e, self.fs, self.folder) for e in entries.take(pa.array(slow)).to_pylist()]
        mask = pa.array(~fast)
        urls = pc.replace_with_mask(urls, mask, pa.array([u for u, _, _ in resolved], pa.string()))
        full = pc.replace_with_mask(full, mask, pa.array(["/".join(p) for _, _, p in resolved], pa.string()))
        protocols[slow] = [p for _, p, _ in resolved]
        return urls, protocols, full, fast

    def _canonical(self, names: pa.Array) -> np.ndarray:
        """The canonical protocol of each scheme name ('' for none: a local path), as objects."""
        encoded = pc.dictionary_encode(names)
        out = []
        for name in encoded.dictionary.to_pylist():
            if name not in self._protocols:
                self._protocols[name] = canonical_protocol(name or None)
            out.append(self._protocols[name])
        return np.asarray(out, object)[encoded.indices.to_numpy(zero_copy_only=False)]


class Manifest:
    """A manifest read once (see the module docstring): `proposals()` gives its rows' proposals,
    `n` is how many entries it lists. Close it (or use it as a context manager)."""

    def __init__(self, fs, path: str, input: str):
        folder = path.rsplit("/", 1)[0] if "/" in path else ""
        resolve = _Resolver(fs, folder)
        self.spool = Spool(SPOOLED)
        protocols: set[str] = set()
        least = greatest = None
        stems = Column(np.int64)
        for entries in _manifest_batches(fs, path, input):
            url, protocol, full, plain = resolve(entries)
            protocols.update(set(protocol.tolist()))
            low, high = pc.min_max(full).values()  # the common folder of the paths is that of their dirs
            least = low.as_py() if least is None else min(least, low.as_py())
            greatest = high.as_py() if greatest is None else max(greatest, high.as_py())
            stem = strip_extensions(full)
            # the stem of a plain path is plain: safe to fold unless it holds a backslash
            stem_hash = hashes(fold_keys(stem, None if any_byte(full, b"\\") else plain))
            stems.append(stem_hash)
            self.spool.append(pa.RecordBatch.from_arrays([url, full, stem, pa.array(stem_hash)], schema=SPOOLED))
        self.n = self.spool.rows
        common = os.path.commonprefix([least, greatest]) if least is not None else ""  # cut at its last '/'
        self.root = common[: common.rfind("/") + 1] if len(protocols) == 1 else ""
        ordered = stems.array()
        del stems
        ordered.sort()
        self.colliding, self.dotted = self._colliding(ordered)
        del ordered

    def _colliding(self, ordered: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the stem hashes two different URLs share: the same URL listed twice shares nothing;
        the stem hashes with a dot in their last part, which may be another entry's name with its
        extension), from every stem hash, sorted. Stems seldom repeat: the spool is read again
        only when some do."""
        repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        if not len(repeated):
            return repeated, repeated
        pairs, dotted = [], []
        for batch in self.spool:
            stem = batch["stem_hash"].to_numpy()
            mine = np.isin(stem, repeated)
            pairs.append(np.stack([stem[mine], hashes(batch["path"].filter(pa.array(mine)))], axis=1))
            dotted.append(stem[matches(batch["stem"], r"\.[^/]*$")])
        pairs = np.unique(np.concatenate(pairs), axis=0)
        again = np.unique(pairs[1:, 0][pairs[1:, 0] == pairs[:-1, 0]])
        return again, np.unique(np.concatenate(dotted))

    def proposals(self) -> Iterator[pa.RecordBatch]:
        group = 0
        for batch in self.spool:
            rel = cut_prefix(batch["full"], self.root)
            unsafe = _unsafe(rel)
            key = pc.if_else(pa.array(unsafe), pa.scalar(None, pa.string()), cut_prefix(batch["stem"], self.root))
            message = [""] * len(batch)
            for i in np.flatnonzero(unsafe).tolist():
                message[i] = _unsafe_message(batch["path"][i].as_py(), rel[i].as_py())
            shared = np.isin(batch["stem_hash"].to_numpy(), self.colliding)
            yields = shared.copy()
            if shared.any():  # the entry's name with extension is another entry's stem, not a shared one
                names = hashes(fold_keys(batch["full"].filter(pa.array(shared))))
                yields[shared] = np.isin(names, self.dotted) & ~np.isin(names, self.colliding)
            n = len(batch)
            yield pa.RecordBatch.from_arrays(
                [
                    batch["path"],
                    rel,
                    key,
                    pa.array(shared),
                    pa.array(yields),
                    pa.array(np.where(unsafe, UNSAFE, ""), pa.string()),
                    pa.array(message, pa.string()),
                    pa.array(np.arange(group, group + n)),
                ],
                schema=PROPOSAL,
            )
            group += n

    def close(self) -> None:
        self.spool.close()

    def __enter__(self) -> "Manifest":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _unsafe(rel: pa.Array) -> np.ndarray:
    """Where `key_from_parts` refuses the parts: none, or one with a NUL, '::' or a backslash, or '..'."""
    return matches(rel, r"^$|\x00|::|\\|(^|/)\.\.(/|$)")


def _unsafe_message(url: str, rel: str) -> str:
    try:
        key_from_parts(parts_of(rel), url)
    except DinosegError as e:
        return str(e)
    raise AssertionError(f"'{url}' was taken for unsafe")  # pragma: no cover


def manifest_rows(fs, path: str, input: str, registry: KeyRegistry | None = None) -> Iterator[dict]:
    """Rows for the manifest at `path` on `fs` (`input` as the user wrote it, for messages), one by
    one; keys are claimed in `registry` (unique over the listing, recorded keys kept)."""
    registry = KeyRegistry() if registry is None else registry
    with Manifest(fs, path, input) as manifest:
        for batch in manifest.proposals():
            for p in batch.to_pylist():
                yield claim_entry(registry, p["path"], parts_of(p["rel"]), p["shared"], p["yields"])
