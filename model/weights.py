"""Named models, where their files live, the download cache, and safe checkpoint loading.

Files are found under a hub base URL in Meta's layout, `{hub}/{m}/{file}` with `m` the backbone
without `_reg` (e.g. `dinov2_vits14/dinov2_vits14_reg4_pretrain.pth`). The hub is Meta's public
file host unless `DINOSEG_HUB` says otherwise (a folder, `file://`, `s3://`, `http://` ...).
Hub files are cached under `DINOSEG_CACHE` (default `~/.cache/dinoseg`) in the same layout and
written atomically. Environment variables are read when a file is needed, never at import.

The hub is opened with its own options, `DINOSEG_HUB_STORAGE_OPTIONS` (JSON: an endpoint, a
profile, `{"anon": true}`), never with a job's `--storage-options`: those are the user's stores'.

Every downloaded file has a sidecar beside it, `<file>.sha256.json`: its size and SHA-256, and
the (size, mtime, ctime, inode) stamp at which it was last verified. A cache hit checks the stamp
(a stat); a file whose stamp changed (rewritten, swapped, touched) is hashed again, and one whose
size or digest is no longer what was downloaded is fetched again once, or refused in one
sentence when the hub cannot be reached. `KNOWN_SHA256` pins the digests of released files
where they are known: a download, a cached file or a local hub's file that differs is refused.

`verified_sha256(path)` is the one digest of a local weights file (what a run's identity
records): a cache entry's comes from its sidecar (a stat); any other file (a --backbone-weights
path, a local hub's file used in place) is hashed once per stamp and memoised in
`{cache}/digests.json`, which keeps the latest stamp of each real path only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbone import BACKBONES, backbone_config
from .errors import UnknownModelError, WeightsError
from .redact import redact_text, redact_url
from .storage import options_for, scope_options

log = logging.getLogger(__name__)

DEFAULT_HUB = "https://dl.fbaipublicfiles.com/dinov2"
DATASETS = {"ade20k": 150, "voc2012": 21}
META_HEADS = ("linear", "ms")
HUB_OPTIONS_ENV = "DINOSEG_HUB_STORAGE_OPTIONS"
SIDECAR = ".sha256.json"  # beside each downloaded hub file: its size and SHA-256
DIGESTS = "digests.json"  # in the cache: the SHA-256 of other local weights files, by real path and stamp
HASH_BUFFER = 8 << 20  # large reads: hashing ViT-g's 4.5 GB file is bound by the disk, not by calls

# SHA-256 of released hub files, by hub-relative path, where the publisher states them. We know
# of none for the DINOv2 files (Meta's hub code loads them with load_state_dict_from_url and no
# check_hash, and their names carry no hash prefix), so the table is empty; a file's entry makes
# its download and every cache hit refuse any other bytes.
KNOWN_SHA256: dict[str, str] = {}


@dataclass(frozen=True)
class SegmentationModel:
    """A backbone paired with one of Meta's released segmentation heads."""

    name: str
    backbone: str
    dataset: str
    head: str  # 'linear' or 'ms'

    @property
    def num_classes(self) -> int:
        return DATASETS[self.dataset]

    def files(self) -> list[str]:
        return [backbone_file(self.backbone), head_file(self.backbone, self.dataset, self.head)]


SEGMENTATION_MODELS: dict[str, SegmentationModel] = {
    f"{b}_{d}_{h}": SegmentationModel(f"{b}_{d}_{h}", b, d, h)
    for b in BACKBONES
    if not b.endswith("_reg")  # Meta released heads for the plain backbones only
    for d in DATASETS
    for h in META_HEADS
}


def _family(backbone: str) -> str:
    return backbone.removesuffix("_reg")


def backbone_file(backbone: str) -> str:
    """Hub-relative path of a backbone's released weights."""
    backbone_config(backbone)  # unknown names fail here, with the list
    m = _family(backbone)
    return f"{m}/{m}_reg4_pretrain.pth" if backbone.endswith("_reg") else f"{m}/{m}_pretrain.pth"


def head_file(backbone: str, dataset: str, kind: str) -> str:
    m = _family(backbone)
    return f"{m}/{m}_{dataset}_{kind}_head.pth"


def segmentation_model(name: str) -> SegmentationModel:
    try:
        return SEGMENTATION_MODELS[name]
    except KeyError:
        from .dinotxt import NAME

        if name == NAME:
            raise UnknownModelError(
                f"{name} segments classes named in words, not a fixed set: pass --classes-text 'sky, road, car' "
                "(or build a head with `dinoseg text-head` and pass --head)."
            ) from None
        known = ", ".join(SEGMENTATION_MODELS)
        raise UnknownModelError(f"Unknown model '{name}'; choose one of: {known} (or run `dinoseg models`).") from None


def hub_url() -> str:
    return os.environ.get("DINOSEG_HUB", DEFAULT_HUB).rstrip("/")


WEIGHTS_ENV = ("DINOSEG_HUB", "DINOSEG_CACHE", HUB_OPTIONS_ENV)
_PATHS_ENV = ("DINOSEG_HUB", "DINOSEG_CACHE")


def hub_storage_options() -> dict:
    """The hub's fsspec options from DINOSEG_HUB_STORAGE_OPTIONS, scoped to the hub's URL (a
    flat object applies to the hub only). Empty when unset."""
    text = os.environ.get(HUB_OPTIONS_ENV, "").strip()
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:  # e.msg only: the text may hold a secret
        raise WeightsError(
            f"{HUB_OPTIONS_ENV} is not valid JSON ({e.msg} at character {e.pos}): set it to a JSON object "
            "of fsspec options, e.g. '{\"anon\": true}', or unset it."
        ) from None
    if not isinstance(options, dict):
        raise WeightsError(
            f"{HUB_OPTIONS_ENV} must be a JSON object: set it to e.g. '{{\"anon\": true}}', or unset it."
        )
    return scope_options(options, [hub_url()], what=HUB_OPTIONS_ENV)


def weights_env() -> dict[str, str]:
    """Where weights come from, as this process's environment says. A job's driver hands it to
    the actors that load weights: workers of a cluster the driver joined do not share its
    environment, and the driver is where the user set it. A local folder is made absolute: the
    workers run in another directory."""
    env = {k: os.environ[k] for k in WEIGHTS_ENV if os.environ.get(k)}
    return {
        k: os.path.abspath(os.path.expanduser(v)) if k in _PATHS_ENV and "://" not in v else v for k, v in env.items()
    }


def use_weights_env(env: dict[str, str] | None) -> None:
    """In a worker process: take the driver's weights settings (see weights_env)."""
    os.environ.update({k: v for k, v in (env or {}).items() if k in WEIGHTS_ENV})


def cache_dir() -> Path:
    return Path(os.environ.get("DINOSEG_CACHE", "~/.cache/dinoseg")).expanduser()


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    return Path(url.removeprefix("file://")).expanduser()


def _download(url: str, dest: Path, options: dict, expected_sha256: str | None = None, hashed: bool = True) -> dict:
    """Copy url to dest through a temporary file in the same folder, then rename (atomic); returns
    {size, sha256, inode} of what was written (`hashed=False`: no sha256, for a file read once and
    deleted). A digest other than `expected_sha256` is refused and leaves dest as it was.
    `options`: fsspec options already meant for url (`options_for`).

    `get_file` streams the whole object, so plain HTTP servers without Range support work too."""
    import fsspec

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        fs.get_file(path, tmp)
        st = os.stat(tmp)
        record = {"size": st.st_size, "inode": st.st_ino}
        if hashed or expected_sha256:
            record["sha256"] = file_sha256(Path(tmp))
        if expected_sha256 and record["sha256"] != expected_sha256:
            raise WeightsError(
                f"{redact_url(url)} has SHA-256 {record['sha256']}, not the published {expected_sha256}: the hub "
                "serves another file; point DINOSEG_HUB at a copy of the released files."
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a shared cache should be readable
        os.replace(tmp, dest)
        return record
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(HASH_BUFFER):
            h.update(chunk)
    return h.hexdigest()


def sidecar_path(cached: Path) -> Path:
    return cached.with_name(cached.name + SIDECAR)


def _stamp(path: Path) -> list[int]:
    st = path.stat()  # ctime too: no user can set it back, so a rewrite with an old mtime shows
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _renew_sidecar(cached: Path, record: dict, hashed_at: list[int]) -> None:
    """On a hit: the verified stamp recorded, where the cache can be written (a shared read-only
    cache is verified by hashing once per process instead)."""
    try:
        _write_sidecar(cached, record, hashed_at)
    except OSError as e:
        log.debug("cannot record the verification of %s (%s): it is hashed again next time", cached, e)


def _write_sidecar(cached: Path, record: dict, hashed_at: list[int] | None = None) -> None:
    """The record beside `cached`, stamped as it is now, if it is still the file that was hashed:
    the download's own inode (another downloader's rename may have replaced it since), or the
    stamp `hashed_at` taken before hashing it. Otherwise nothing is written: the file is
    verified again next time."""
    stamp = _stamp(cached)
    if record.get("inode") is not None and stamp[3] != record["inode"]:
        log.debug("%s was replaced by another download: its sidecar is theirs to write", cached)
        return
    if hashed_at is not None and stamp != hashed_at:
        return
    data = {"size": record["size"], "sha256": record["sha256"], "verified": stamp}
    side = sidecar_path(cached)
    fd, tmp = tempfile.mkstemp(prefix=f".{side.name}.", suffix=".part", dir=cached.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, side)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_sidecar(cached: Path) -> dict | None:
    try:
        data = json.loads(sidecar_path(cached).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(data, dict) and isinstance(data.get("size"), int) and isinstance(data.get("sha256"), str)
    return data if ok else None


def _cache_problem(cached: Path, relpath: str) -> str | None:
    """Why the cached copy cannot be used (None: it is the file that was downloaded). A cheap
    stat when its stamp is the verified one; otherwise it is hashed (and the stamp renewed)."""
    pinned = KNOWN_SHA256.get(relpath)
    record = _read_sidecar(cached)
    stamp = _stamp(cached)
    if record is None:  # cached by an older dinoseg, or the sidecar was lost: hashed once, recorded
        log.info("verifying %s (no %s beside it)", cached, SIDECAR)
        record = {"size": stamp[0], "sha256": _memo_sha256(cached, stamp, persist=False)}
        if pinned and record["sha256"] != pinned:
            return f"its SHA-256 is {record['sha256']}, not the published {pinned}"
        _renew_sidecar(cached, record, stamp)
        return None
    if stamp[0] != record["size"]:
        return f"it has {stamp[0]} bytes, not the {record['size']} that were downloaded"
    if pinned and record["sha256"] != pinned:
        return f"it was downloaded with SHA-256 {record['sha256']}, not the published {pinned}"
    if record.get("verified") == stamp:
        return None
    digest = _memo_sha256(cached, stamp, persist=False)  # a read-only cache: once per process
    if digest != record["sha256"]:
        return f"its SHA-256 is {digest}, not the {record['sha256']} that was downloaded"
    _renew_sidecar(cached, record, stamp)
    return None


# the latest (stamp, sha256) of each real path hashed in this process
_MEMO: dict[str, tuple[list[int], str]] = {}


def _memo_sha256(path: Path, stamp: list[int] | None = None, persist: bool = True) -> str:
    """SHA-256 of a local file, hashed once per stamp: memoised in this process and, `persist`,
    in `{cache}/digests.json` (the latest stamp of each real path, so it does not grow with
    every version of a file). A file that changes while it is hashed is not memoised."""
    real = os.path.realpath(path)
    stamp = stamp or _stamp(Path(real))
    hit = _MEMO.get(real)
    if hit and hit[0] == stamp:
        return hit[1]
    memo = _read_memo() if persist else {}
    entry = memo.get(real)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        _MEMO[real] = (stamp, entry["sha256"])
        return entry["sha256"]
    digest = file_sha256(Path(real))
    if _stamp(Path(real)) != stamp:
        return digest
    _MEMO[real] = (stamp, digest)
    if persist:
        memo[real] = {"stamp": stamp, "sha256": digest}
        _write_memo(memo)
    return digest


def _read_memo() -> dict:
    try:
        memo = json.loads((cache_dir() / DIGESTS).read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _write_memo(memo: dict) -> None:
    """Atomic (two processes at once: one's entry may be lost, and hashed again next time)."""
    path = cache_dir() / DIGESTS
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{DIGESTS}.", suffix=".part", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:  # an earlier version's entries (one per stamp) are dropped
                json.dump({k: v for k, v in memo.items() if isinstance(v, dict) and "stamp" in v}, f)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:  # a read-only cache: hashed again by the next process, nothing worse
        log.debug("cannot memoise a weights digest in %s: %s", path, e)


def _cache_relpath(path: Path) -> str | None:
    """`path`'s hub-relative path if it is an entry of the weights cache, else None."""
    real, cache = os.path.realpath(path), os.path.realpath(cache_dir())
    if not real.startswith(cache + os.sep):
        return None
    return os.path.relpath(real, cache).replace(os.sep, "/")


def verified_sha256(path: Path | str) -> str:
    """The SHA-256 of a local weights file, hashed at most once per version of it: a cache
    entry's from its sidecar, after the cache's check (a stat); any other file's memoised by
    real path and stamp (`_memo_sha256`)."""
    path = Path(path)
    relpath = _cache_relpath(path)
    if relpath is not None and _read_sidecar(path) is not None and _cache_problem(path, relpath) is None:
        record = _read_sidecar(path)
        if record is not None and record.get("verified") == _stamp(path):
            return record["sha256"]
    return _memo_sha256(path)


def fetch_hub_file(relpath: str) -> Path:
    """The local cached copy of `{hub}/{relpath}`, downloaded on first use (with the hub's own
    options, `hub_storage_options`), verified on every use."""
    cached = cache_dir() / relpath
    problem = _cache_problem(cached, relpath) if cached.is_file() else None
    if cached.is_file() and problem is None:
        return cached
    hub = hub_url()
    if is_local(hub) and problem is None:
        source = local_path(hub) / relpath
        if source.is_file():  # a local hub is used in place, not copied; a pinned digest still holds
            pinned = KNOWN_SHA256.get(relpath)
            if pinned and (digest := _memo_sha256(source)) != pinned:
                raise WeightsError(
                    f"{source} has SHA-256 {digest}, not the published {pinned}: the hub folder holds another "
                    "file; put a copy of the released file there."
                )
            return source
    url = f"{hub}/{relpath}"
    shown = redact_url(url)
    if problem:
        log.warning("cached %s is damaged (%s): downloading it again from %s", cached, problem, shown)
    else:
        log.info("downloading %s to %s", shown, cached)
    options = hub_storage_options()
    try:
        record = _download(url, cached, options_for(url, options), KNOWN_SHA256.get(relpath))
    except WeightsError:
        raise
    except Exception as e:  # network, permissions, missing file: one sentence with the way out
        if problem:
            raise WeightsError(
                f"The cached weights file {cached} is damaged ({problem}) and {shown} cannot be fetched again "
                f"({type(e).__name__}): delete {cached} and re-run when the hub is reachable, or copy the "
                "released file there."
            ) from None
        raise WeightsError(
            f"Cannot fetch {shown} ({type(e).__name__}: {redact_text(str(e))}); without access to it, copy the "
            f"files into a folder laid out as {{hub}}/{relpath} and set DINOSEG_HUB to that folder "
            f"(or pass the weights' path with --backbone-weights / --head; the hub's own options go in {HUB_OPTIONS_ENV})."
        ) from None
    _write_sidecar(cached, record)
    return cached


def load_checkpoint(source: str, storage_options: dict | None = None):
    """`torch.load(weights_only=True)` of a local path or any fsspec URL, with clear errors.

    Remote files are streamed to a temporary file and memory-mapped, so a large backbone is not
    held twice in memory.
    """
    if is_local(source):
        path = local_path(source)
        if not path.is_file():
            raise WeightsError(f"Weights file {source} does not exist: check the path or URL.")
        return _safe_load(path, source)
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".remote-{os.getpid()}-{abs(hash(source)):x}.pth"
    shown = redact_url(source)
    try:
        try:
            _download(source, tmp, options_for(source, storage_options), hashed=False)  # read once, deleted
        except FileNotFoundError:
            raise WeightsError(f"Weights file {shown} does not exist: check the path or URL.") from None
        except Exception as e:
            raise WeightsError(
                f"Cannot read {shown} ({type(e).__name__}: {redact_text(str(e))}): check the URL and credentials."
            ) from None
        return _safe_load(tmp, shown)
    finally:
        tmp.unlink(missing_ok=True)


def _safe_load(path: Path, source: str):
    with open(path, "rb") as f:
        is_zip = zipfile.is_zipfile(f)
        f.seek(0)
        is_pickle = f.read(1) == b"\x80"  # the PROTO opcode every torch.save pickle starts with
    if not (is_zip or is_pickle):
        raise WeightsError(
            f"{source} is not a readable PyTorch checkpoint (neither a zip archive nor a pickle: truncated, "
            "or another format): download it again, or pass a .pth/.pt file."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e) and "Unsupported global" in str(e):
            raise WeightsError(
                f"{source} needs to unpickle code to load, and dinoseg only loads plain tensors "
                "(weights_only=True): re-save it as a state dict of tensors."
            ) from None
        raise WeightsError(f"{source} is not a PyTorch checkpoint (or it is truncated): download it again.") from None
    except Exception as e:  # the weights-only unpickler raises KeyError, IndexError ... on non-checkpoints
        raise WeightsError(
            f"{source} is not a readable PyTorch checkpoint ({type(e).__name__}; truncated or another format): "
            "download it again."
        ) from None


def dinotxt_files() -> dict[str, str]:
    """Hub-relative paths of dino.txt's files: its vision head, text encoder and vocabulary."""
    from .dinotxt import TEXT_ENCODER_FILE, VISION_HEAD_FILE, VOCAB_FILE

    return {"vision_head": VISION_HEAD_FILE, "text_encoder": TEXT_ENCODER_FILE, "vocabulary": VOCAB_FILE}


def describe_models() -> list[dict]:
    """Rows for `dinoseg models`: every named model and the hub files it needs."""
    from .dinotxt import BACKBONE, NAME

    rows = [{"name": name, "kind": "backbone", "classes": "-", "files": [backbone_file(name)]} for name in BACKBONES]
    rows.append(
        {
            "name": NAME,
            "kind": "open-vocabulary (dino.txt)",
            "classes": "named in words",
            "files": [backbone_file(BACKBONE), *dinotxt_files().values()],
        }
    )
    rows += [
        {
            "name": m.name,
            "kind": f"segmentation ({m.head})",
            "classes": f"{m.dataset} ({m.num_classes})",
            "files": m.files(),
        }
        for m in SEGMENTATION_MODELS.values()
    ]
    return rows
