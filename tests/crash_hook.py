"""Test helper: kill a process group at the n-th write of one kind, for crash-point tests.

`hook_env(folder, point, n)` writes a `sitecustomize.py` into `folder` and returns the
environment that makes every Python process started with it (a job's driver, and Ray's workers,
which inherit the driver's environment) wrap os.replace: the calls of one kind are counted across
processes in a file, and at the n-th the process group gets SIGKILL. The points:

- mask-write: a mask's temporary file is whole, its rename has not happened;
- mask-rename: a mask is in place, its row not yet published;
- part-publish: a predictions/ part is in place.

`killed(env)` says whether the kill happened."""

from __future__ import annotations

import os
from pathlib import Path

POINTS = ("mask-write", "mask-rename", "part-publish")

HOOK = '''
"""Test-only: SIGKILL this job's process group at the n-th os.replace of one kind."""
import os, signal, threading

_SPEC = os.environ.get("DINOSEG_TEST_KILL")  # point:n:counter-file
if _SPEC:
    _point, _n, _counter = _SPEC.split(":", 2)
    _n, _real, _lock = int(_n), os.replace, threading.Lock()

    def _kind(src, dst):
        src, dst = os.fspath(src), os.fspath(dst)
        if src.endswith(".dinoseg-tmp") and "/masks/" in dst:
            return "mask"
        if src.endswith(".dinoseg-tmp") and "/predictions/" in dst and dst.endswith(".parquet"):
            return "part"
        return None

    def _count():
        with _lock:
            fd = os.open(_counter, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                os.write(fd, b"x")
                return os.fstat(fd).st_size
            finally:
                os.close(fd)

    def _kill():
        open(_counter + ".killed", "w").close()
        os.killpg(os.getpgid(0), signal.SIGKILL)

    def replace(src, dst, *args, **kwargs):
        kind = _kind(src, dst)
        if _point == "mask-write" and kind == "mask" and _count() >= _n:
            _kill()  # the temporary file is whole; the rename never happens
        _real(src, dst, *args, **kwargs)
        if (_point, kind) in (("mask-rename", "mask"), ("part-publish", "part")) and _count() >= _n:
            _kill()

    os.replace = replace
'''


def hook_env(folder: Path, point: str, n: int, env: dict | None = None) -> dict:
    """`env` (default: this process's) with the hook on PYTHONPATH, set to kill at the n-th `point`."""
    assert point in POINTS and n >= 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(HOOK)
    counter = folder / f"count-{point}-{n}"
    for stale in (counter, Path(f"{counter}.killed")):
        stale.unlink(missing_ok=True)
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)
    env["DINOSEG_TEST_KILL"] = f"{point}:{n}:{counter}"
    return env


def killed(env: dict) -> bool:
    return Path(env["DINOSEG_TEST_KILL"].split(":", 2)[2] + ".killed").exists()
