"""Keys: an input's path under the INPUT root -> its key, sanitised or refused."""

from __future__ import annotations

import pytest

from model.errors import DinosegError
from pipeline.data.keys import make_key


def test_make_key_sanitises():
    assert make_key("s3://b/in", "s3://b/in/x/y.jpg") == "x/y"
    assert make_key("s3://b/in/", "s3://b/in//x/./y.tar.jpg") == "x/y.tar"
    assert make_key("/p", "/p/x/y.png", keep_extension=True) == "x/y.png"
    assert make_key("/p/a.jpg", "/p/a.jpg") == "a"
    assert make_key("C:\\data", "C:\\data\\sub\\img.jpg") == "sub/img"  # backslashes are separators
    assert make_key("", "/abs/olute/a.jpg") == "abs/olute/a"  # never a leading '/'
    for bad in ("/p/../etc/passwd.jpg", "/p/x/..\\..\\y.jpg", "/p/a::memory://x.jpg", "/p/a\x00.jpg"):
        with pytest.raises(DinosegError, match="'..'|NUL"):
            make_key("/p", bad)
    with pytest.raises(DinosegError, match="not under"):
        make_key("/p", "/q/a.jpg")
    with pytest.raises(DinosegError, match="not under"):
        make_key("s3://p", "gs://p/a.jpg")
