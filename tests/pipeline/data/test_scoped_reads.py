"""Headers meant for one https host reach that host only: not the other hosts a manifest lists,
not the weights hub (storage options scoped by `model.storage`, read by `ReadBytes`)."""

from __future__ import annotations

import numpy as np
import torch
from headers_server import serve

from jobs.options import scoped_storage_options
from model.weights import fetch_hub_file
from pipeline.data.sources import ReadBytes, list_inputs

TOKEN = {"headers": {"Authorization": "Bearer for-host-a"}}


def test_a_manifests_hosts_get_only_the_headers_meant_for_them(tmp_path, monkeypatch):
    for name in ("a", "b", "hub"):
        (tmp_path / name).mkdir()
    (tmp_path / "a" / "1.jpg").write_bytes(b"A1")
    (tmp_path / "b" / "2.jpg").write_bytes(b"B2")
    (tmp_path / "hub" / "dinov2_tiny").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "hub" / "dinov2_tiny" / "t.pth")
    with serve(tmp_path / "a") as a, serve(tmp_path / "b") as b, serve(tmp_path / "hub") as hub:
        (tmp_path / "a" / "list.txt").write_text(f"{a.url}/1.jpg\n{b.url}/2.jpg\n")
        # as the command line gives them: plain options, with INPUT on host a and a local OUTPUT
        options = scoped_storage_options(
            {"input": f"{a.url}/list.txt", "output": str(tmp_path / "out"), "storage_options": TOKEN}
        )
        rows = list(list_inputs(f"{a.url}/list.txt", options))
        batch = {k: np.array([r[k] for r in rows], dtype=object) for k in ("path", "key")}
        out = ReadBytes(options)(batch)
        assert list(out["bytes"]) == [b"A1", b"B2"] and list(out["error_stage"]) == ["", ""]

        monkeypatch.setenv("DINOSEG_HUB", hub.url)  # a job with these options fetches its weights
        fetch_hub_file("dinov2_tiny/t.pth")

    assert a.headers("Authorization") == {"Bearer for-host-a"}  # the manifest and its image on host a
    assert b.seen and b.headers("Authorization") == {None}  # another host of the manifest
    assert hub.seen and hub.headers("Authorization") == {None}  # the hub has options of its own
