"""Named models, where their files live, the download cache, and safe checkpoint loading.

Files are found under a hub base URL in Meta's layout, `{hub}/{m}/{file}` with `m` the backbone
without `_reg` (e.g. `dinov2_vits14/dinov2_vits14_reg4_pretrain.pth`). The hub is Meta's public
file host unless `DINOSEG_HUB` says otherwise (a folder, `file://`, `s3://`, `http://` ...).
Hub files are cached under `DINOSEG_CACHE` (default `~/.cache/dinoseg`) in the same layout and
written atomically. Environment variables are read when a file is needed, never at import.
"""

from __future__ import annotations

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

log = logging.getLogger(__name__)

DEFAULT_HUB = "https://dl.fbaipublicfiles.com/dinov2"
DATASETS = {"ade20k": 150, "voc2012": 21}
META_HEADS = ("linear", "ms")


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


WEIGHTS_ENV = ("DINOSEG_HUB", "DINOSEG_CACHE")


def weights_env() -> dict[str, str]:
    """Where weights come from, as this process's environment says. A job's driver hands it to
    the actors that load weights: workers of a cluster the driver joined do not share its
    environment, and the driver is where the user set it. A local folder is made absolute: the
    workers run in another directory."""
    env = {k: os.environ[k] for k in WEIGHTS_ENV if os.environ.get(k)}
    return {k: v if "://" in v else os.path.abspath(os.path.expanduser(v)) for k, v in env.items()}


def use_weights_env(env: dict[str, str] | None) -> None:
    """In a worker process: take the driver's weights settings (see weights_env)."""
    os.environ.update({k: v for k, v in (env or {}).items() if k in WEIGHTS_ENV})


def cache_dir() -> Path:
    return Path(os.environ.get("DINOSEG_CACHE", "~/.cache/dinoseg")).expanduser()


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> Path:
    return Path(url.removeprefix("file://")).expanduser()


def _download(url: str, dest: Path, storage_options: dict | None) -> None:
    """Copy url to dest through a temporary file in the same folder, then rename (atomic).

    `get_file` streams the whole object, so plain HTTP servers without Range support work too."""
    import fsspec

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    os.close(fd)
    try:
        fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        fs.get_file(path, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a shared cache should be readable
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fetch_hub_file(relpath: str, storage_options: dict | None = None) -> Path:
    """The local cached copy of `{hub}/{relpath}`, downloaded on first use."""
    cached = cache_dir() / relpath
    if cached.is_file():
        return cached
    hub = hub_url()
    if is_local(hub):
        source = local_path(hub) / relpath
        if source.is_file():  # a local hub is used in place, not copied
            return source
    url = f"{hub}/{relpath}"
    log.info("downloading %s to %s", url, cached)
    try:
        _download(url, cached, storage_options)
    except Exception as e:  # network, permissions, missing file: one sentence with the way out
        raise WeightsError(
            f"Cannot fetch {url} ({type(e).__name__}: {e}); without access to it, copy the files "
            f"into a folder laid out as {{hub}}/{relpath} and set DINOSEG_HUB to that folder "
            "(or pass the weights' path with --backbone-weights / --head)."
        ) from None
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
    try:
        try:
            _download(source, tmp, storage_options)
        except FileNotFoundError:
            raise WeightsError(f"Weights file {source} does not exist: check the path or URL.") from None
        except Exception as e:
            raise WeightsError(
                f"Cannot read {source} ({type(e).__name__}: {e}): check the URL and credentials."
            ) from None
        return _safe_load(tmp, source)
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
