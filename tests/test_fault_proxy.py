"""The fault proxy (tests/faults.py) does what the fault tests rely on: a `lost` write lands at the
store though its client never hears so, a `cut` that had no body to cut is not counted as a fault,
`once` lets a request's retry through, and `outage_at` refuses connections for a while, then the
endpoint answers again on the same port."""

from __future__ import annotations

import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ResponseStreamingError
from faults import FaultProxy


@pytest.fixture
def proxied(s3_server, s3_bucket):
    bucket, _ = s3_bucket
    proxy = FaultProxy(s3_server, seed=1, stall_s=0.5)

    def client(attempts: int):
        return boto3.client(
            "s3",
            endpoint_url=proxy.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(retries={"max_attempts": attempts, "mode": "standard"}, read_timeout=2, connect_timeout=1),
        )

    direct = boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    yield proxy, bucket, client, direct
    proxy.close()


def test_a_lost_answer_is_a_write_that_landed(proxied):
    proxy, bucket, client, direct = proxied
    proxy.set({"write": 1.0}, ("lost",))
    with pytest.raises(ConnectionClosedError):  # every try lands, none is answered
        client(1).put_object(Bucket=bucket, Key="a", Body=b"landed")
    assert direct.get_object(Bucket=bucket, Key="a")["Body"].read() == b"landed"
    assert proxy.injected[("write", "lost")] >= 1 and len(proxy.injected) == 1
    assert set(proxy.applied) == {("write", "lost", "PUT", f"/{bucket}/a")}

    # `once`: the client's retry of the same request goes through; the conditional create it
    # retries finds the object its first try made (what a lease or a publish must survive)
    proxy.set({"write": 1.0}, ("lost",), once=True)
    with pytest.raises(Exception, match="PreconditionFailed"):
        client(3).put_object(Bucket=bucket, Key="b", Body=b"x", IfNoneMatch="*")
    assert direct.get_object(Bucket=bucket, Key="b")["Body"].read() == b"x"
    assert [a[3] for a in proxy.applied].count(f"/{bucket}/b") == 1


def test_a_cut_is_counted_only_where_there_was_a_body_to_cut(proxied):
    proxy, bucket, client, direct = proxied
    direct.put_object(Bucket=bucket, Key="c", Body=b"0123456789" * 100)
    proxy.set({"write": 1.0, "read": 1.0}, ("cut",), once=True)
    client(3).put_object(Bucket=bucket, Key="d", Body=b"x")  # a PUT's answer has no body: nothing cut
    assert not proxy.injected
    with pytest.raises(ResponseStreamingError):  # a GET's body: half of it, then a reset
        client(3).get_object(Bucket=bucket, Key="c")["Body"].read()
    assert proxy.injected == {("read", "cut"): 1}


def test_an_outage_refuses_connections_then_the_endpoint_is_back(proxied):
    proxy, bucket, client, direct = proxied
    s3 = client(1)
    proxy.outage_at("write", 2, seconds=2.0)
    s3.put_object(Bucket=bucket, Key="e", Body=b"1")  # the first write: answered
    with pytest.raises((EndpointConnectionError, ConnectionClosedError)):
        s3.put_object(Bucket=bucket, Key="f", Body=b"2")  # the second begins the outage
    assert proxy.outages == 1 and set(proxy.injected) == {("write", "outage")}
    time.sleep(0.2)  # the accept loop stopped
    assert time.monotonic() < proxy.down_until - 0.2, "the test was too slow to see the outage"
    with pytest.raises(EndpointConnectionError):  # a new connection is refused meanwhile
        client(1).list_objects_v2(Bucket=bucket)
    time.sleep(max(proxy.down_until - time.monotonic(), 0) + 0.3)
    assert [o["Key"] for o in client(1).list_objects_v2(Bucket=bucket)["Contents"]] == ["e"]
