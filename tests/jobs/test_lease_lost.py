"""A run whose OUTPUT lease is taken over while it runs publishes none of the rows it holds, and
neither compacts errors/ nor writes run.json: the run that holds OUTPUT now redoes those keys.
For `segment` (whose write tasks publish predictions/ and read the lease before each part), and for
`pseudo-label`'s selection pass (its own lease on OUTPUT, its rows written by the driver)."""
# ruff: noqa: F811  (head_file: test_segment's module fixture, taken as an argument)

import json

import pytest
from test_segment import SMALL, head_file, jpeg  # noqa: F401  (head_file: the module's fixture)

from model.errors import DinosegError
from pipeline import runtime
from pipeline.io.lease import LEASE_NAME, Lease


def lost_after_first_results(monkeypatch, command: str, columns: str = "ok"):
    """The lease of the `command` run is taken over once it has the first results of a loop whose
    tables have `columns` (its renewal thread finds another run's lease and sets `lost`)."""
    leases = []
    init, iter_results = Lease.__init__, runtime.iter_results

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        leases.append(self)

    def taken_over(ds, *args, **kwargs):
        for table in iter_results(ds, *args, **kwargs):
            yield table
            if columns in table.column_names:
                for lease in leases:
                    lease.lost = lease.lost or lease.command == command

    monkeypatch.setattr(Lease, "__init__", record)
    monkeypatch.setattr(runtime, "iter_results", taken_over)


def taken_over_as_the_results_start(monkeypatch, out) -> None:
    """Another run takes OUTPUT's lease over as the segment graph starts (it runs lazily: no task has
    published yet): lease.json becomes that run's record, which the write tasks read before each part."""
    iter_results = runtime.iter_results

    def taken_over(ds, *args, **kwargs):
        path = out / LEASE_NAME
        path.write_text(json.dumps(json.loads(path.read_text()) | {"run_id": "another-run", "nonce": "other"}))
        yield from iter_results(ds, *args, **kwargs)

    monkeypatch.setattr(runtime, "iter_results", taken_over)


@pytest.mark.slow  # a real Ray
def test_segment_that_lost_its_lease_publishes_nothing_more(ray_local, tmp_path, head_file, monkeypatch):
    from pipeline.segment import SegmentConfig, run_segment

    src, out = tmp_path / "photos", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(jpeg(24, 24, i))
    (src / "broken.jpg").write_bytes(b"not a jpeg")  # an error row, buffered on the driver
    monkeypatch.setenv("DINOSEG_PART_ROWS", "1")  # a part per row: each task reads the lease
    taken_over_as_the_results_start(monkeypatch, out)
    with pytest.raises(DinosegError, match="taken over by another run") as e:
        run_segment(SegmentConfig(str(src), str(out), model=None, head=head_file, **SMALL))
    assert "\n" not in str(e.value)
    assert not list(out.glob("predictions/*.parquet")) and not list(out.glob("errors/*.parquet"))
    assert not (out / "run.json").exists()
    assert json.loads((out / LEASE_NAME).read_text())["run_id"] == "another-run"  # the new holder's: kept


@pytest.mark.slow  # a real Ray
def test_pseudo_label_that_lost_its_lease_in_the_selection_publishes_nothing_more(
    ray_local, tmp_path, head_file, monkeypatch
):
    from pipeline.label import PseudoLabelConfig, run_pseudo_label
    from pipeline.segment import SegmentConfig

    src, out = tmp_path / "photos", tmp_path / "out"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(jpeg(24, 24, i))
    lost_after_first_results(monkeypatch, "pseudo-label", columns="coverage")
    config = PseudoLabelConfig(SegmentConfig(str(src), str(out), model=None, head=head_file, **SMALL))
    with pytest.raises(DinosegError, match="taken over by another run"):
        run_pseudo_label(config)
    assert (out / "raw" / "run.json").exists()  # the model pass (raw/'s own lease) finished
    assert not list(out.glob("labels/*.parquet")) and not list(out.glob("errors/*.parquet"))
    assert not (out / "pairs.csv").exists() and not (out / "run.json").exists()
