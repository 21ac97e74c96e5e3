"""Rolling Parquet parts: published whole, sized, and read back for resume."""

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.schema import ERROR_SCHEMA
from pipeline.io.parts import RollingParquetWriter, done_keys


def rows(keys):
    return pa.table(
        {
            "path": [f"/in/{k}.jpg" for k in keys],
            "key": keys,
            "stage": ["decode"] * len(keys),
            "error_type": ["DecodeError"] * len(keys),
            "message": ["bad"] * len(keys),
        }
    )


def test_parts_roll_by_rows_and_only_complete_parts_count(tmp_path):
    w = RollingParquetWriter(str(tmp_path / "p"), ERROR_SCHEMA, max_rows=3)
    w.write(rows(["a", "b"]))
    assert done_keys(str(tmp_path / "p")) == set()  # nothing published yet: a kill now loses no file
    w.write(rows(["c", "d"]))  # 4 rows >= 3: the part is published
    assert done_keys(str(tmp_path / "p")) == {"a", "b", "c", "d"}
    w.write(rows(["e"]))
    w.close()
    parts = sorted((tmp_path / "p").glob("*.parquet"))
    assert len(parts) == 2 and not list((tmp_path / "p").glob(".*"))
    assert pq.read_table(parts).schema.equals(ERROR_SCHEMA)
    assert done_keys(str(tmp_path / "p")) == set("abcde")


def test_done_keys_of_a_missing_folder_is_empty(tmp_path):
    assert done_keys(str(tmp_path / "nothing")) == set()


def test_s3_parts(s3_bucket):
    bucket, so = s3_bucket
    w = RollingParquetWriter(f"s3://{bucket}/out/errors", ERROR_SCHEMA, so)
    w.write(rows(["x/y", "z"]))
    w.close()
    assert done_keys(f"s3://{bucket}/out/errors", so) == {"x/y", "z"}
