"""Backbone weights: strict loading from paths and URLs, the hub and its cache, layouts, errors.

The weights are random tensors in Meta's key layout (conftest's `vits14_state_dict`); the hub is
a folder, a loopback HTTP server or a loopback S3 endpoint laid out as Meta's file host is.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import fsspec
import pytest
import torch

from model.backbone import BACKBONES, DinoVisionTransformer, backbone_config, build_backbone
from model.convert import to_meta_layout
from model.errors import DinosegError, UnknownModelError, WeightsError
from model.hub import build_segmenter, load_backbone
from model.weights import (
    SEGMENTATION_MODELS,
    backbone_file,
    fetch_hub_file,
    hub_url,
    load_checkpoint,
    segmentation_model,
    sidecar_path,
)

HUB_FILE = "dinov2_vits14/dinov2_vits14_pretrain.pth"


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    different = [k for k, v in expected.items() if not torch.equal(got[k], v)]
    assert not different, f"tensors differ: {different[:5]}"


def files_under(folder: Path) -> list[Path]:
    """Every file under folder, hidden ones (temporary downloads) included."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).exists() else []


def link_or_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


@pytest.fixture(scope="module")
def meta_hub(tmp_path_factory, vits14_file) -> Path:
    """A folder laid out as Meta's file host: {hub}/dinov2_vits14/dinov2_vits14_pretrain.pth."""
    hub = tmp_path_factory.mktemp("hub")
    link_or_copy(vits14_file, hub / HUB_FILE)
    return hub


@pytest.fixture(autouse=True)
def _skip_random_init(monkeypatch):
    """load_backbone overwrites every tensor of the model it builds (strict load): skip the slow
    random init. The weights in the files are random in every tensor, so nothing passes unloaded."""
    monkeypatch.setattr(DinoVisionTransformer, "reset_parameters", lambda self: None)


@pytest.fixture(scope="module")
def s3_hub(s3_new_bucket, vits14_file) -> tuple[str, dict]:
    """A bucket laid out as Meta's file host (one upload for the module: moto is slow at 88 MB).
    Returns (hub URL, storage_options)."""
    bucket, so = s3_new_bucket()
    fsspec.filesystem("s3", **so).put_file(str(vits14_file), f"{bucket}/dinov2/{HUB_FILE}")
    return f"s3://{bucket}/dinov2", so


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("DINOSEG_CACHE", str(folder))
    return folder


# --- strict round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_round_trip_from_local_file(vits14_file, vits14_state_dict, cache, as_url):
    source = f"file://{vits14_file}" if as_url else str(vits14_file)
    model = load_backbone("dinov2_vits14", weights=source)
    assert_same_weights(model, vits14_state_dict)
    assert files_under(cache) == []  # a local file is read in place


def test_round_trip_from_s3(vits14_state_dict, s3_hub, cache):
    hub, so = s3_hub
    model = load_backbone("dinov2_vits14", weights=f"{hub}/{HUB_FILE}", storage_options=so)
    assert_same_weights(model, vits14_state_dict)
    assert files_under(cache) == []  # the temporary download is gone


def test_round_trip_from_http(vits14_file, vits14_state_dict, http_server, cache):
    server = http_server(vits14_file.parent)
    model = load_backbone("dinov2_vits14", weights=f"{server.url}/{vits14_file.name}")
    assert_same_weights(model, vits14_state_dict)
    assert ("GET", f"/{vits14_file.name}") in server.requests
    assert files_under(cache) == []


def test_http_server_without_range_support(vits14_file, vits14_state_dict, http_server, cache):
    server = http_server(vits14_file.parent, ranges=False)
    loaded = load_checkpoint(f"{server.url}/{vits14_file.name}")
    assert set(loaded) == set(vits14_state_dict)
    different = [k for k, v in vits14_state_dict.items() if not torch.equal(loaded[k], v)]
    assert not different, f"tensors differ: {different[:5]}"  # the whole file, not a prefix of it
    assert ("GET", f"/{vits14_file.name}") in server.requests
    assert files_under(cache) == []  # the temporary download is gone


def test_missing_remote_file_says_it_does_not_exist(s3_bucket, cache):
    bucket, so = s3_bucket
    url = f"s3://{bucket}/weights/nope.pth"
    with pytest.raises(WeightsError, match="does not exist") as e:
        load_checkpoint(url, storage_options=so)
    assert url in str(e.value)
    assert files_under(cache) == []


# --- the hub and its cache --------------------------------------------------------------------


def test_http_hub_downloads_once_then_loads_from_the_cache(
    meta_hub, vits14_file, vits14_state_dict, http_server, cache, monkeypatch
):
    server = http_server(meta_hub)
    monkeypatch.setenv("DINOSEG_HUB", server.url + "/")  # a trailing slash is fine
    assert_same_weights(load_backbone("dinov2_vits14"), vits14_state_dict)

    assert ("GET", f"/{HUB_FILE}") in server.requests
    cached = cache / HUB_FILE
    assert files_under(cache) == [cached, sidecar_path(cached)]  # in Meta's layout, no .part file left behind
    assert filecmp.cmp(cached, vits14_file, shallow=False)

    before = len(server.requests)
    assert fetch_hub_file(HUB_FILE) == cached  # what load_backbone reads its weights from
    assert len(server.requests) == before  # the second time, the hub is not asked


def test_cached_file_is_used_even_when_the_hub_is_down(vits14_file, vits14_state_dict, cache, monkeypatch):
    link_or_copy(vits14_file, cache / HUB_FILE)
    monkeypatch.setenv("DINOSEG_HUB", "http://127.0.0.1:9")  # nothing listens there
    assert fetch_hub_file(HUB_FILE) == cache / HUB_FILE
    assert_same_weights(load_backbone("dinov2_vits14"), vits14_state_dict)


def test_s3_hub_has_its_own_storage_options(vits14_file, vits14_state_dict, s3_hub, cache, monkeypatch):
    """The hub is opened with DINOSEG_HUB_STORAGE_OPTIONS; a job's storage options are its
    stores', and never reach the hub (here they would point at no endpoint at all)."""
    hub, so = s3_hub
    monkeypatch.setenv("DINOSEG_HUB", hub)
    monkeypatch.setenv("DINOSEG_HUB_STORAGE_OPTIONS", json.dumps(so))
    elsewhere = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "key": "x", "secret": "y"}
    assert_same_weights(load_backbone("dinov2_vits14", storage_options=elsewhere), vits14_state_dict)
    assert files_under(cache) == [cache / HUB_FILE, sidecar_path(cache / HUB_FILE)]
    assert filecmp.cmp(cache / HUB_FILE, vits14_file, shallow=False)


@pytest.mark.parametrize("as_url", [False, True], ids=["folder", "file-url"])
def test_local_hub_is_used_in_place(meta_hub, vits14_state_dict, cache, monkeypatch, as_url):
    monkeypatch.setenv("DINOSEG_HUB", f"file://{meta_hub}" if as_url else str(meta_hub))
    assert fetch_hub_file(backbone_file("dinov2_vits14")) == meta_hub / HUB_FILE
    if not as_url:
        assert_same_weights(load_backbone("dinov2_vits14"), vits14_state_dict)
    assert files_under(cache) == []  # not copied


def test_hub_file_names_follow_meta():
    assert backbone_file("dinov2_vits14") == HUB_FILE
    assert backbone_file("dinov2_vitg14_reg") == "dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth"
    assert segmentation_model("dinov2_vitl14_ade20k_ms").files() == [
        "dinov2_vitl14/dinov2_vitl14_pretrain.pth",
        "dinov2_vitl14/dinov2_vitl14_ade20k_ms_head.pth",
    ]


def test_missing_hub_file_leaves_nothing_in_the_cache(tmp_path, http_server, cache, monkeypatch):
    empty = tmp_path / "empty-hub"
    empty.mkdir()
    server = http_server(empty)
    monkeypatch.setenv("DINOSEG_HUB", server.url)
    with pytest.raises(WeightsError) as e:
        fetch_hub_file(backbone_file("dinov2_vits14"))
    message = str(e.value)
    assert f"{server.url}/{HUB_FILE}" in message and "DINOSEG_HUB" in message
    assert server.requests  # it did try the hub
    assert files_under(cache) == []


def test_interrupted_download_leaves_no_partial_file(meta_hub, http_server, cache, monkeypatch):
    server = http_server(meta_hub, truncate=True)  # every body stops halfway
    monkeypatch.setenv("DINOSEG_HUB", server.url)
    with pytest.raises(WeightsError, match="DINOSEG_HUB"):
        fetch_hub_file(HUB_FILE)
    assert ("GET", f"/{HUB_FILE}") in server.requests
    assert files_under(cache) == []  # neither the file nor a .part


def test_missing_file_in_a_local_hub_names_dinoseg_hub(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("DINOSEG_HUB", str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match="DINOSEG_HUB") as e:
        fetch_hub_file(HUB_FILE)
    assert HUB_FILE in str(e.value)
    assert files_under(cache) == []


# --- clear errors -----------------------------------------------------------------------------


def test_unknown_segmentation_model_lists_the_known_ones():
    with pytest.raises(UnknownModelError) as e:
        segmentation_model("dinov2_vitx14_voc2012_linear")
    assert isinstance(e.value, DinosegError) and isinstance(e.value, KeyError)
    message = str(e.value)
    assert message.startswith("Unknown model 'dinov2_vitx14_voc2012_linear'")  # not KeyError's quoting
    assert "dinov2_vits14_voc2012_linear" in message
    assert all(name in message for name in SEGMENTATION_MODELS)
    assert "dinoseg models" in message
    with pytest.raises(UnknownModelError, match="dinov2_vits14_voc2012_linear"):
        build_segmenter("dinov2_vitx14_voc2012_linear")


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(UnknownModelError) as e:
        backbone_config("dinov2_vitx14")
    message = str(e.value)
    assert message.startswith("Unknown backbone 'dinov2_vitx14'")
    assert all(name in message for name in BACKBONES)
    assert len(BACKBONES) == 8
    with pytest.raises(UnknownModelError, match="dinov2_vits14_reg"):
        load_backbone("dinov2_vitx14", weights="random")


def test_missing_local_file(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match="does not exist") as e:
        load_backbone("dinov2_vits14", weights=str(missing))
    assert str(missing) in str(e.value)


class _Pickled:
    """Stands for anything torch.save can pickle that is not plain tensors."""

    def __init__(self):
        self.weight = torch.zeros(2)

    def __reduce__(self):
        return (_record_unpickling, ())


UNPICKLED: list[str] = []


def _record_unpickling():
    UNPICKLED.append("ran")
    return _Pickled.__new__(_Pickled)


def _truncated(path: Path, original: Path) -> None:
    data = original.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["truncated", "text", "csv", "jpeg", "empty"])
def test_unreadable_files_are_one_sentence(tmp_path, vits14_file, kind):
    path = tmp_path / f"weights-{kind}.pth"
    if kind == "truncated":
        _truncated(path, vits14_file)
    elif kind == "text":
        path.write_text("hello world\n")
    elif kind == "csv":
        path.write_text("a,b\n1,2\n")
    elif kind == "jpeg":
        path.write_bytes(
            b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
            + torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
            .numpy()
            .tobytes()
        )
    else:
        path.write_bytes(b"")
    with pytest.raises(WeightsError) as e:
        load_checkpoint(str(path))
    message = str(e.value)
    assert str(path) in message
    assert "PyTorch checkpoint" in message and "download it again" in message


def test_checkpoint_that_needs_code_is_refused_without_running_it(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": _Pickled(), "blocks.0.norm1.weight": torch.ones(384)}, path)
    UNPICKLED.clear()
    with pytest.raises(WeightsError) as e:
        load_checkpoint(str(path))
    message = str(e.value)
    assert "unpickle" in message and "weights_only" in message and str(path) in message
    assert UNPICKLED == []  # the code in the file never ran


def test_file_without_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.ones(3), path)
    with pytest.raises(WeightsError, match="no state dict of tensors"):
        load_backbone("dinov2_vits14", weights=str(path))


def test_wrong_shape_names_the_key(tmp_path, vits14_state_dict):
    sd = dict(vits14_state_dict)
    sd["blocks.3.mlp.fc1.weight"] = torch.zeros(1000, 384)
    path = tmp_path / "bent.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as e:
        load_backbone("dinov2_vits14", weights=str(path))
    message = str(e.value)
    assert "do not fit dinov2_vits14" in message
    assert "blocks.3.mlp.fc1.weight (1000, 384) vs (1536, 384)" in message
    assert "look like" not in message  # otherwise it is a vits14: no misleading guess


@pytest.fixture(scope="module")
def vits14_reg_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights-reg") / "dinov2_vits14_reg4_pretrain.pth"
    g = torch.Generator().manual_seed(7)  # random in every tensor, as conftest's vits14_state_dict
    torch.save(
        {k: torch.randn(v.shape, generator=g) for k, v in build_backbone("dinov2_vits14_reg").state_dict().items()},
        path,
    )
    return path


def test_register_weights_loaded_as_plain_model_are_recognised(vits14_reg_file):
    with pytest.raises(WeightsError) as e:
        load_backbone("dinov2_vits14", weights=str(vits14_reg_file))
    message = str(e.value)
    assert "do not fit dinov2_vits14" in message
    assert "unexpected keys (e.g. register_tokens)" in message
    assert "look like dinov2_vits14_reg weights" in message


def test_plain_weights_loaded_as_register_model_are_recognised(vits14_file):
    with pytest.raises(WeightsError) as e:
        load_backbone("dinov2_vits14_reg", weights=str(vits14_file))
    message = str(e.value)
    assert "do not fit dinov2_vits14_reg" in message
    assert "missing keys (e.g. register_tokens)" in message
    assert "look like dinov2_vits14 weights" in message


# --- other layouts of the same weights ----------------------------------------------------------


def _chunked(sd: dict, chunks: int = 4, depth: int = 12) -> dict:
    """Meta's FSDP layout: blocks.{chunk}.{global index}.… with depth/chunks blocks per chunk."""
    per = depth // chunks
    out = {}
    for k, v in sd.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            k = f"blocks.{int(i) // per}.{i}.{rest}"
        out[k] = v
    return out


def _layout(sd: dict, name: str):
    if name == "module":
        return {f"module.{k}": v for k, v in sd.items()}
    if name == "backbone":
        return {f"backbone.{k}": v for k, v in sd.items()}
    if name == "teacher":  # Meta's teacher_checkpoint.pth: backbone and DINO/iBOT heads
        heads = {
            "dino_head.mlp.0.weight": torch.randn(16, 384),
            "dino_head.mlp.0.bias": torch.randn(16),
            "dino_head.last_layer.weight_g": torch.randn(32, 1),
            "ibot_head.mlp.0.weight": torch.randn(16, 384),
        }
        return {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, **heads}}
    if name == "chunked":
        return _chunked(sd)
    if name == "ddp-chunked":
        return {"state_dict": {f"module.backbone.{k}": v for k, v in _chunked(sd).items()}, "epoch": 3}
    raise ValueError(name)


LAYOUTS = ["module", "backbone", "teacher", "chunked", "ddp-chunked"]


def test_chunked_keys_hold_global_indices(vits14_state_dict):
    keys = _chunked(vits14_state_dict)
    assert "blocks.0.2.norm1.weight" in keys and "blocks.1.3.norm1.weight" in keys
    assert "blocks.3.11.ls2.gamma" in keys and "blocks.3.0.norm1.weight" not in keys


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_convert_to_meta_keys(vits14_state_dict, layout):
    converted = to_meta_layout(_layout(vits14_state_dict, layout))
    assert list(converted) == list(vits14_state_dict)  # exactly Meta's keys, which load strictly
    assert all(converted[k] is v for k, v in vits14_state_dict.items())  # the same tensors


@pytest.mark.parametrize("layout", ["teacher", "ddp-chunked"])
def test_layouts_load_from_files(tmp_path, vits14_state_dict, layout):
    path = tmp_path / f"{layout}.pth"
    torch.save(_layout(vits14_state_dict, layout), path)
    assert_same_weights(load_backbone("dinov2_vits14", weights=str(path)), vits14_state_dict)


def test_the_drivers_weights_settings_travel_to_workers(monkeypatch, tmp_path):
    from model.weights import use_weights_env, weights_env

    monkeypatch.setenv("DINOSEG_HUB", str(tmp_path / "hub"))
    monkeypatch.delenv("DINOSEG_CACHE", raising=False)
    sent = weights_env()
    assert sent == {"DINOSEG_HUB": str(tmp_path / "hub")}  # what is unset stays unset (the worker's default)
    monkeypatch.setenv("DINOSEG_HUB", "elsewhere")  # a worker started with another environment
    use_weights_env(sent | {"PATH": "/nowhere"})  # only the weights settings are taken
    assert hub_url() == str(tmp_path / "hub") and os.environ["PATH"] != "/nowhere"


def test_relative_weights_folders_are_sent_as_absolute_paths(monkeypatch, tmp_path):
    from model.weights import weights_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DINOSEG_CACHE", "./cache")  # relative to the user's folder, not the worker's
    monkeypatch.setenv("DINOSEG_HUB", "s3://my-bucket/weights")
    assert weights_env() == {"DINOSEG_CACHE": str(tmp_path / "cache"), "DINOSEG_HUB": "s3://my-bucket/weights"}


def test_hub_storage_options_travel_to_workers_as_they_are(monkeypatch):
    from model.weights import weights_env

    monkeypatch.setenv("DINOSEG_HUB_STORAGE_OPTIONS", '{"anon": true}')  # not a path: sent unchanged
    assert weights_env()["DINOSEG_HUB_STORAGE_OPTIONS"] == '{"anon": true}'


# --- the cache's sidecar: size and SHA-256 of every download, checked on every hit ------------------

TINY = "dinov2_tiny/tiny.pth"


@pytest.fixture
def tiny_hub(tmp_path, http_server, cache, monkeypatch):
    """A loopback http hub holding one small checkpoint (hashing it costs nothing)."""
    root = tmp_path / "tiny-hub"
    (root / TINY).parent.mkdir(parents=True)
    torch.save({"w": torch.arange(1000.0)}, root / TINY)
    server = http_server(root)
    monkeypatch.setenv("DINOSEG_HUB", server.url)
    return root / TINY, server


def test_download_records_size_and_sha256_beside_the_file(tiny_hub, cache):
    original, _ = tiny_hub
    cached = fetch_hub_file(TINY)
    record = json.loads(sidecar_path(cached).read_text())
    assert record["size"] == original.stat().st_size
    assert record["sha256"] == hashlib.sha256(original.read_bytes()).hexdigest()


def test_a_verified_hit_costs_a_stat_not_a_hash(tiny_hub, cache, monkeypatch):
    import model.weights as weights

    _, server = tiny_hub
    fetch_hub_file(TINY)
    hashed = []
    monkeypatch.setattr(weights, "file_sha256", lambda path: hashed.append(path) or "x")
    before = len(server.requests)
    assert fetch_hub_file(TINY) == cache / TINY
    assert hashed == [] and len(server.requests) == before


@pytest.mark.parametrize("damage", ["truncated", "same-size", "swapped"])
def test_a_damaged_cache_file_is_fetched_again(tiny_hub, cache, damage, caplog):
    original, server = tiny_hub
    cached = fetch_hub_file(TINY)
    data = bytearray(cached.read_bytes())
    if damage == "truncated":
        cached.write_bytes(data[: len(data) // 2])
    elif damage == "same-size":  # one byte flipped in place, its mtime set back: ctime still tells
        st = cached.stat()
        data[len(data) // 2] ^= 0xFF
        cached.write_bytes(bytes(data))
        os.utime(cached, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:  # another file renamed over it, of the same size
        other = cached.with_name("other")
        data[-10] ^= 0xFF
        other.write_bytes(bytes(data))
        os.replace(other, cached)
    before = len(server.requests)
    with caplog.at_level(logging.WARNING, logger="model.weights"):
        assert fetch_hub_file(TINY) == cached
    assert len(server.requests) > before  # downloaded again
    assert cached.read_bytes() == original.read_bytes()
    assert "damaged" in caplog.text and str(cached) in caplog.text


def test_a_damaged_cache_file_is_refused_when_the_hub_is_down(tiny_hub, cache, monkeypatch):
    _, server = tiny_hub
    cached = fetch_hub_file(TINY)
    cached.write_bytes(cached.read_bytes()[:-1])
    server.stop()
    with pytest.raises(WeightsError) as e:
        fetch_hub_file(TINY)
    message = str(e.value)
    assert str(cached) in message and "damaged" in message and f"delete {cached}" in message
    with pytest.raises(WeightsError):  # and it stays refused: nothing loads the damaged bytes
        fetch_hub_file(TINY)


def test_a_cache_entry_without_sidecar_is_hashed_once(tiny_hub, cache, monkeypatch):
    """An entry an older dinoseg cached: hashed once, its sidecar written, then trusted by stat."""
    original, server = tiny_hub
    link_or_copy(original, cache / TINY)
    server.stop()  # not needed: the entry is used as it is
    assert fetch_hub_file(TINY) == cache / TINY
    assert (
        json.loads(sidecar_path(cache / TINY).read_text())["sha256"]
        == hashlib.sha256(original.read_bytes()).hexdigest()
    )


def test_pinned_hashes_accept_the_published_file_and_refuse_another(tiny_hub, cache, monkeypatch):
    import model.weights as weights

    original, server = tiny_hub
    good = hashlib.sha256(original.read_bytes()).hexdigest()
    monkeypatch.setitem(weights.KNOWN_SHA256, TINY, good)
    assert fetch_hub_file(TINY) == cache / TINY  # match: downloaded, cached

    monkeypatch.setitem(weights.KNOWN_SHA256, TINY, "0" * 64)  # the hub and the cache hold another file
    with pytest.raises(WeightsError) as e:
        fetch_hub_file(TINY)  # the cached copy is refused, and so is the hub's
    assert "0" * 64 in str(e.value) and good in str(e.value)

    for p in files_under(cache):
        p.unlink()
    with pytest.raises(WeightsError, match="not the published"):
        fetch_hub_file(TINY)
    assert files_under(cache) == []  # a download that differs is not kept


def test_bad_hub_storage_options_are_one_sentence(tiny_hub, cache, monkeypatch):
    for text, expected in (
        ('{"anon": tru', "is not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"s3": {"anon": true}, "anon": true}', "mixes scopes"),
    ):
        monkeypatch.setenv("DINOSEG_HUB_STORAGE_OPTIONS", text)
        with pytest.raises(DinosegError, match=expected) as e:
            fetch_hub_file(TINY)
        assert "DINOSEG_HUB_STORAGE_OPTIONS" in str(e.value)


def test_hub_storage_options_reach_the_hub_only(tmp_path, http_server, cache, monkeypatch):
    """DINOSEG_HUB_STORAGE_OPTIONS' headers go to the hub; a job's storage options do not."""
    import headers_server

    root = tmp_path / "hub"
    (root / TINY).parent.mkdir(parents=True)
    torch.save({"w": torch.ones(3)}, root / TINY)
    with headers_server.serve(root) as server:
        monkeypatch.setenv("DINOSEG_HUB", server.url)
        monkeypatch.setenv("DINOSEG_HUB_STORAGE_OPTIONS", json.dumps({"headers": {"X-Hub": "hub-token"}}))
        fetch_hub_file(TINY)
        assert [h.get("X-Hub") for _, h in server.seen] and all(h.get("X-Hub") == "hub-token" for _, h in server.seen)


# --- one digest per weights file: verified_sha256 ------------------------------------------------


def _counting_hashes(monkeypatch) -> list:
    import model.weights as weights

    hashed, real = [], weights.file_sha256
    monkeypatch.setattr(weights, "file_sha256", lambda path: hashed.append(Path(path)) or real(path))
    return hashed


def test_a_remote_checkpoint_read_once_is_not_hashed(tiny_hub, cache, monkeypatch):
    """load_checkpoint of a URL (--backbone-weights, --head) streams to a temporary file, loads it and
    deletes it: hashing it (1.2 GB per actor for ViT-L) would be for nothing."""
    _, server = tiny_hub
    hashed = _counting_hashes(monkeypatch)
    assert torch.equal(load_checkpoint(f"{server.url}/{TINY}")["w"], torch.arange(1000.0))
    assert hashed == []


def test_a_local_hub_used_in_place_is_held_to_its_pinned_digest(tmp_path, cache, monkeypatch):
    import model.weights as weights

    hub = tmp_path / "hub"
    (hub / TINY).parent.mkdir(parents=True)
    torch.save({"w": torch.ones(3)}, hub / TINY)
    monkeypatch.setenv("DINOSEG_HUB", str(hub))
    good = hashlib.sha256((hub / TINY).read_bytes()).hexdigest()
    monkeypatch.setitem(weights.KNOWN_SHA256, TINY, good)
    hashed = _counting_hashes(monkeypatch)
    assert fetch_hub_file(TINY) == hub / TINY and fetch_hub_file(TINY) == hub / TINY
    assert len(hashed) == 1  # hashed once: the second use is a stat (memoised by its stamp)
    assert weights.verified_sha256(hub / TINY) == good and len(hashed) == 1

    monkeypatch.setitem(weights.KNOWN_SHA256, TINY, "0" * 64)  # the folder holds another file
    with pytest.raises(WeightsError, match="not the published"):
        fetch_hub_file(TINY)


def test_a_sidecar_is_written_for_the_file_that_was_hashed_only(tiny_hub, cache, monkeypatch):
    """Two downloaders at once: if another's rename replaced this one's file before its sidecar
    was written, this one's digest is not stamped onto the other's bytes."""
    import model.weights as weights

    download = weights._download

    def raced(url, dest, *args, **kwargs):
        record = download(url, dest, *args, **kwargs)
        other = dest.with_name("other.part")
        other.write_bytes(dest.read_bytes()[:-1] + b"\0")  # the other downloader got other bytes
        os.replace(other, dest)
        return record

    monkeypatch.setattr(weights, "_download", raced)
    cached = fetch_hub_file(TINY)
    assert not sidecar_path(cached).exists()  # not this download's file any more: no record of it
    monkeypatch.setattr(weights, "_download", download)
    fetch_hub_file(TINY)  # no sidecar: the file there is hashed and recorded as it is
    assert json.loads(sidecar_path(cached).read_text())["sha256"] == hashlib.sha256(cached.read_bytes()).hexdigest()


def test_verified_sha256_of_a_cache_entry_is_its_sidecars(tiny_hub, cache, monkeypatch):
    import model.weights as weights

    cached = fetch_hub_file(TINY)  # downloaded and hashed once
    hashed = _counting_hashes(monkeypatch)
    assert weights.verified_sha256(cached) == json.loads(sidecar_path(cached).read_text())["sha256"]
    assert hashed == [] and not (cache / weights.DIGESTS).exists()


def test_verified_sha256_of_another_file_is_hashed_once_per_version(tmp_path, cache, monkeypatch):
    import model.weights as weights

    path = tmp_path / "mine.pth"
    path.write_bytes(b"one")
    hashed = _counting_hashes(monkeypatch)
    assert weights.verified_sha256(path) == hashlib.sha256(b"one").hexdigest()
    monkeypatch.setattr(weights, "_MEMO", {})  # another process: digests.json remembers
    assert weights.verified_sha256(path) == hashlib.sha256(b"one").hexdigest() and len(hashed) == 1
    path.write_bytes(b"two")  # a new version: hashed again, and the memo keeps only the latest
    assert weights.verified_sha256(path) == hashlib.sha256(b"two").hexdigest() and len(hashed) == 2
    memo = json.loads((cache / weights.DIGESTS).read_text())
    assert (
        list(memo) == [os.path.realpath(path)]
        and memo[os.path.realpath(path)]["sha256"] == hashlib.sha256(b"two").hexdigest()
    )
