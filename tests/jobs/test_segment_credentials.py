"""Storage options reach only the stores they were given for, and no credential persists.

`segment` from and to a loopback S3 endpoint named only by --storage-options (as a MinIO or R2
user gives it), with a named model whose weights come from a loopback http hub on an empty
cache; and a run whose secrets sit in its storage options, in an input URL's user-info and in a
presigned query, after which no output file, run.json, log or console line holds them."""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq
import pytest
import test_segment
import typer
from hubs import write_hub
from test_segment import jpeg

head_file = test_segment.head_file  # its module fixture: a small dinoseg head
MODEL = "dinov2_vits14_voc2012_linear"
SMALL = ["--resolution", "56", "--decode-cpus", "0.25", "--cpus-per-actor", "0.5", "--actors", "1"]
CANARY = "CANARY-d1n0seg-7f3a"


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    write_hub(root, [MODEL])
    return root


def segment(argv: list[str], log_file) -> int:
    """`dinoseg segment ARGV` in this process, with the console and the run's log at DEBUG."""
    import jobs.segment
    from jobs.options import run_command
    from pipeline.runtime import console

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command()(jobs.segment.command)
    console.configure(verbose=True, log_file=str(log_file))
    for handler in console._state["handlers"]:
        handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)
    try:
        return run_command(app, argv, prog="dinoseg segment")
    finally:
        root.setLevel(level)


@pytest.mark.slow  # a real Ray
def test_s3_in_and_out_by_storage_options_with_a_named_model_from_an_http_hub(
    ray_local, s3_bucket, hub_folder, http_server, tmp_path, monkeypatch
):
    import fsspec

    bucket, so = s3_bucket
    fs = fsspec.filesystem("s3", **so)
    fs.pipe({f"{bucket}/in/one.jpg": jpeg(50, 40, 5), f"{bucket}/in/sub/two.jpg": jpeg(20, 30, 6)})
    hub = http_server(hub_folder)
    monkeypatch.setenv("DINOSEG_HUB", f"{hub.url}/")
    argv = [f"s3://{bucket}/in", f"s3://{bucket}/out", "--model", MODEL, "--storage-options", json.dumps(so), *SMALL]
    assert segment(argv, tmp_path / "run.log") == 0
    assert ("GET", "/dinov2_vits14/dinov2_vits14_pretrain.pth") in hub.requests  # the cache was empty
    assert fs.exists(f"{bucket}/out/masks/one.png") and fs.exists(f"{bucket}/out/masks/sub/two.png")
    info = json.loads(fs.cat(f"{bucket}/out/run.json"))
    assert info["counts"] == {"inputs": 2, "predicted": 2, "skipped": 0, "failed": 0} | {
        k: v for k, v in info["counts"].items() if k not in ("inputs", "predicted", "skipped", "failed")
    }
    assert info["model"] == MODEL


def _strings(table) -> list[str]:
    import pyarrow as pa

    out = []
    for column in table.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            out += [v for v in column.to_pylist() if v]
    return out


@pytest.mark.slow  # a real Ray
def test_no_credential_persists_in_outputs_logs_or_the_console(
    ray_local,
    s3_bucket,
    head_file,
    http_server,
    tmp_path,
    capfd,
):
    import fsspec

    bucket, so = s3_bucket
    so = so | {"secret": CANARY}  # the loopback endpoint takes any secret; a real one would be checked
    images = tmp_path / "web"
    (images / "a").mkdir(parents=True)
    (images / "b").mkdir()
    (images / "a" / "x.jpg").write_bytes(jpeg(30, 20, 1))
    (images / "b" / "y.jpg").write_bytes(jpeg(20, 30, 2))
    web = http_server(images)
    host = web.url.removeprefix("http://")
    manifest = [
        f"http://user:{CANARY}@{host}/a/x.jpg",  # user-info
        f"http://{host}/b/y.jpg?X-Amz-Signature={CANARY}&X-Amz-Expires=300",  # a presigned URL
        f"http://user:{CANARY}@{host}/a/missing.jpg?sig={CANARY}",  # both, and it fails: an error row
    ]
    fs = fsspec.filesystem("s3", **so)
    fs.pipe(f"{bucket}/lists/images.txt", "\n".join(manifest).encode())
    out = f"{bucket}/out"
    argv = [f"s3://{bucket}/lists/images.txt", f"s3://{out}", "--head", head_file, "--backbone-weights", "random"]
    argv += ["--storage-options", json.dumps(so), "--overlays", *SMALL]
    assert segment(argv, tmp_path / "run.log") == 0
    console = capfd.readouterr()

    files = fs.find(out)
    assert any(f.endswith("run.json") for f in files) and any("/errors/" in f for f in files)
    seen = {}
    for f in files:
        data = fs.cat(f)
        seen[f] = data
        if f.endswith(".parquet"):  # zstd would hide a plain search: read the string columns too
            table = pq.read_table(fs.open(f))
            seen[f + " (strings)"] = "\n".join(_strings(table)).encode()
    rows = [r for f in files if f.endswith(".parquet") for r in pq.read_table(fs.open(f)).to_pylist()]
    assert sorted(r["key"] for r in rows) == ["a/missing", "a/x", "b/y"]
    error = next(r for r in rows if r["key"] == "a/missing")
    assert error["path"] == f"http://***@{host}/a/missing.jpg?sig=***"  # still names the image
    seen["log file"] = (tmp_path / "run.log").read_bytes()
    seen["stdout"], seen["stderr"] = console.out.encode(), console.err.encode()
    assert seen["log file"] and b"segment" in seen["log file"].lower()  # the log did record the run
    leaked = [name for name, data in seen.items() if CANARY.encode() in data]
    assert leaked == []


def test_a_config_built_in_python_sends_its_plain_headers_to_its_https_input(tmp_path):
    """run_segment(SegmentConfig(...)) scopes plain options as the command line does: an https
    INPUT's host gets the headers (it got none), no other host does. The run stops at the
    missing head, after the listing and before any Ray work."""
    from headers_server import serve

    from model.errors import WeightsError
    from pipeline.segment import SegmentConfig, run_segment

    (tmp_path / "web").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.jpg").write_bytes(b"x")
    with serve(tmp_path / "web") as a, serve(tmp_path / "other") as b:
        (tmp_path / "web" / "list.txt").write_text(f"{a.url}/a.jpg\n{b.url}/b.jpg\n")
        config = SegmentConfig(
            f"{a.url}/list.txt",
            str(tmp_path / "out"),
            model=None,
            head=str(tmp_path / "missing.pt"),
            storage_options={"headers": {"Authorization": f"Bearer {CANARY}"}},
        )
        with pytest.raises(WeightsError, match="does not exist"):
            run_segment(config)
    assert a.seen and a.headers("Authorization") == {f"Bearer {CANARY}"}
    assert b.seen == []  # a manifest's other host is only read by the actors, and would get nothing


def test_an_s3_dict_given_with_an_https_manifest_stays_with_the_bucket(s3_bucket, tmp_path, capsys):
    """From the command line: plain S3 options, an https manifest INPUT and an s3 OUTPUT. The
    manifest's host gets none of them (aiohttp refuses `key` and an endpoint client argument)."""
    from headers_server import serve

    bucket, so = s3_bucket
    (tmp_path / "web").mkdir()
    with serve(tmp_path / "web") as web:
        (tmp_path / "web" / "list.txt").write_text(f"{web.url}/a.jpg\n")
        argv = [f"{web.url}/list.txt", f"s3://{bucket}/out", "--head", str(tmp_path / "missing.pt")]
        assert segment([*argv, "--storage-options", json.dumps(so), *SMALL], tmp_path / "run.log") == 2
    err = capsys.readouterr().err
    assert "missing.pt does not exist" in err  # the listing worked: no TypeError from aiohttp
    assert web.seen and all(path == "/list.txt" for path, _ in web.seen)
