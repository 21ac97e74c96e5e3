"""run.json, local and on a loopback S3."""

from __future__ import annotations

import json
import os

import fsspec

from pipeline.io.records import write_run_json


def test_run_json_local_and_s3(tmp_path, s3_bucket):
    info = {"args": {"input": "s3://in/"}, "counts": {"inputs": 3}, "model": "m"}
    url = write_run_json(str(tmp_path / "out"), info)
    assert json.loads(open(url).read()) == info and os.listdir(tmp_path / "out") == ["run.json"]
    bucket, so = s3_bucket
    url = write_run_json(f"s3://{bucket}/out/", info, so)
    assert url == f"s3://{bucket}/out/run.json"
    assert json.loads(fsspec.filesystem("s3", **so).cat_file(url)) == info
