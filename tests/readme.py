"""The README's commands, for the tests that run them.

Every command in a ```bash block of README.md is run by a test that takes it from here with
`command(prefix)` (so a README edit changes what the test runs), by `.ci/run`, or is listed in
NOT_RUN with the reason; tests/test_readme.py checks that no command is left out. Commands run
in a workspace laid out as the README assumes (./photos, ./syn, ...): paths and bucket names are
the README's own; only the environment differs (a local weights hub with random weights, a
loopback S3 endpoint, a local Ray head).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Commands no test can run here, and why. Each still has a check of its own.
NOT_RUN = {
    "ray up cluster.yaml": "starts AWS machines; tests/test_cluster_config.py validates cluster.yaml with Ray's schema",
    "ray dashboard cluster.yaml": "needs the AWS head of `ray up`; the job tests talk to a local head's dashboard",
    "ray down cluster.yaml": "stops the AWS machines of `ray up`",
    "export RAY_ADDRESS=http://127.0.0.1:8265": "the job tests point RAY_ADDRESS at the local head they start",
}
CI_RUN = ("./test.sh",)  # .ci/run calls these (test_readme checks that it does)


def commands(text: str | None = None) -> list[list[str]]:
    """Each command of the README's bash blocks as argv: `\\`-continued lines joined, comments dropped."""
    text = README.read_text() if text is None else text
    found = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                found.append(argv)
    return found


def command(prefix: str) -> list[str]:
    """The README command that starts with `prefix` (as written, spaces normalised), or is it.
    Several identical ones count as one; two different ones are an error: make the prefix longer."""
    matches = {tuple(c) for c in commands() if shlex.join(c).startswith(prefix)}
    exact = {m for m in matches if shlex.join(m) == prefix}
    matches = exact or matches  # a whole command is itself, not the start of a longer one
    if len(matches) != 1:
        raise LookupError(f"{len(matches)} README commands start with {prefix!r}: {sorted(matches)}")
    return list(matches.pop())


def run_in_process(argv: list[str], cwd: Path) -> int:
    """Run `./dinoseg ...` or `python -m jobs.NAME ...` in this process (with this session's
    Ray) from `cwd`, as the shell would from the repository checkout. Returns the exit status."""
    import functools

    if argv[0] == "./dinoseg":
        from jobs.cli import main

        entry, args = main, argv[1:]
    elif argv[:2] == ["python", "-m"] and argv[2].startswith("jobs."):
        from jobs.options import main

        entry, args = functools.partial(main, argv[2]), argv[3:]
    else:
        raise ValueError(f"not a dinoseg command: {shlex.join(argv)}")
    before = os.getcwd()
    os.chdir(cwd)
    try:
        return entry(args)
    finally:
        os.chdir(before)


def run_script(
    argv: list[str], cwd: Path, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run a README command as its own process, `./dinoseg` being this checkout's script."""
    if argv[0] == "./dinoseg":
        argv = [str(ROOT / "dinoseg"), *argv[1:]]
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
