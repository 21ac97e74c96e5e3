"""Transient faults (pipeline.io.retry): what counts as one, and trying again."""

from __future__ import annotations

import errno

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from s3fs.errors import translate_boto_error

from pipeline.io import retry
from pipeline.io.retry import is_transient, retry_each, retryable_error, with_retries


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "PutObject")


@pytest.mark.parametrize(
    "error",
    [
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ConnectionResetError(),
        TimeoutError(),
        translate_boto_error(client_error("SlowDown")),  # s3fs's OSError(EBUSY)
        translate_boto_error(client_error("InternalError")),
        client_error("SlowDown"),
        OSError(errno.EIO, "I/O error"),
    ],
)
def test_transient_errors(error):
    assert is_transient(error)


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("x"),
        PermissionError("x"),
        translate_boto_error(client_error("AccessDenied")),
        translate_boto_error(client_error("NoSuchKey")),
        OSError(errno.ENOSPC, "no space"),
        OSError("Couldn't deserialize thrift: No more data to read."),  # pyarrow: a damaged Parquet footer
        OSError("Corrupt snappy compressed data."),  # and page: no errno, no store's fault
        ValueError("bad"),
        client_error("InvalidArgument"),
    ],
)
def test_permanent_errors(error):
    assert not is_transient(error)


def test_a_damaged_parquet_file_is_not_transient():
    import pyarrow as pa
    import pyarrow.parquet as pq

    with pa.BufferOutputStream() as out:
        pq.write_table(pa.table({"k": ["a"] * 100}), out)
        data = out.getvalue().to_pybytes()
    with pytest.raises(OSError) as e:
        pq.read_table(pa.BufferReader(data[:-12] + bytes(8) + data[-4:]))
    assert type(e.value) is OSError and e.value.errno is None  # what pyarrow raises for it
    assert not is_transient(e.value)


def test_transient_cause_counts():
    try:
        try:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        except Exception as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert is_transient(e)


def test_retryable_rows():
    assert retryable_error("read", "EndpointConnectionError")
    assert retryable_error("write", "OSError")
    assert not retryable_error("decode", "DinosegError")
    assert not retryable_error("list", "KeyCollision")
    assert not retryable_error("list", "UnsafePath")
    assert not retryable_error("read", "FileNotFoundError")


def test_with_retries_gets_past_transient_faults():
    calls, waits = [], []

    def fn():
        calls.append(1)
        if len(calls) < 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return "ok"

    assert with_retries(fn, "x", sleep=waits.append) == "ok"
    assert len(calls) == 3 and waits == [retry.BACKOFF_S, 2 * retry.BACKOFF_S]


def test_with_retries_raises_permanent_at_once_and_transient_at_last():
    calls = []

    def permanent():
        calls.append(1)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        with_retries(permanent, "x", sleep=lambda s: None)
    assert len(calls) == 1

    def down():
        calls.append(1)
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    calls.clear()
    with pytest.raises(EndpointConnectionError):
        with_retries(down, "x", attempts=3, sleep=lambda s: None)
    assert len(calls) == 3


def test_retry_each_reads_only_the_failed_items_again():
    seen = []
    flaky = {"b": 2}  # fails twice

    def fetch(items):
        seen.append(list(items))
        out = []
        for it in items:
            if it == "gone":
                out.append(FileNotFoundError(it))
            elif flaky.get(it, 0):
                flaky[it] -= 1
                out.append(ConnectionResetError(it))
            else:
                out.append(it.upper())
        return out

    results = retry_each(fetch, ["a", "b", "gone"], sleep=lambda s: None)
    assert results[:2] == ["A", "B"] and isinstance(results[2], FileNotFoundError)
    assert seen == [["a", "b", "gone"], ["b"], ["b"]]


def _response_error(status: int):
    from aiohttp import ClientResponseError, RequestInfo
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    info = RequestInfo(URL("http://127.0.0.1:1/a.jpg"), "GET", CIMultiDictProxy(CIMultiDict()))
    return ClientResponseError(info, (), status=status, message="status")


@pytest.mark.parametrize("status, transient", [(503, True), (429, True), (504, True), (403, False), (400, False)])
def test_an_http_hosts_busy_statuses_are_transient(status, transient):
    assert is_transient(_response_error(status)) is transient


def test_an_http_host_answering_503_is_read_again(monkeypatch):
    """fsspec's http filesystem does not retry a 503: the read does, and gets the image."""
    import http.server
    import threading

    import numpy as np

    from pipeline.data.sources import ReadBytes

    answers = [503, 200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            status = answers.pop(0) if answers else 200
            self.send_response(status)
            self.send_header("Content-Length", "5" if status == 200 else "0")
            self.end_headers()
            if status == 200:
                self.wfile.write(b"image")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(retry, "BACKOFF_S", 0.01)
    try:
        url = f"http://127.0.0.1:{server.server_port}/a.jpg"
        out = ReadBytes()({"path": np.array([url], dtype=object), "key": np.array(["a"], dtype=object)})
    finally:
        server.shutdown()
    assert out["error_type"][0] == "" and out["bytes"][0] == b"image"
    assert answers == []  # the 503 was answered, then the image
