"""Long keys at the write step: a name the output filesystem can hold is written, whatever the
temporary name; one it cannot hold is one clear error row, never a traceback or a stray file."""

from __future__ import annotations

import os

from test_write import VOC, blobs, make_batch, rows

from pipeline.segment.write import WriteConfig, WriteMasks


def test_a_key_too_long_for_the_output_filesystem_is_one_error_row(tmp_path):
    """A key from an object store can be 1,024 bytes; a local OUTPUT allows 255 per name. The
    over-long one fails alone, in one sentence; a 250-byte one beside it is written."""
    out = tmp_path / "out"
    fits, too_long = "d/" + "f" * 250, "d/" + "t" * 300
    got = rows(
        WriteMasks(WriteConfig(str(out), VOC, io_threads=1))(make_batch([blobs(8, 8, 21)] * 2, [fits, too_long]))
    )
    assert got[fits]["ok"] and os.listdir(out / "masks" / "d") == ["f" * 250 + ".png"]
    bad = got[too_long]
    assert not bad["ok"] and bad["stage"] == "write" and bad["error_type"] == "DinosegError"
    assert "304 bytes, too long for this filesystem" in bad["message"] and "shorten the input's name" in bad["message"]
    assert bad["message"].count(". ") == 0 and len(bad["message"]) < len(too_long) + 250  # one sentence
