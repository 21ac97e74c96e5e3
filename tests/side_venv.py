"""Virtual environments of their own for the real tools the tests talk to (Label Studio,
Datumaro): their pins are their own (Datumaro's would move pyarrow, pillow and pandas back a
version in the project's environment), so they never go into the project's.

`ensure(name, package, version)` installs package==version into `$DINOSEG_<NAME>_VENV`, default
`<repo>/.venv-<name>` (git-ignored), unless it holds that version already, and returns its
python. A tool that cannot be installed raises `Unavailable` with pip's last lines: the tests
that need it fail with the reason, they never skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL_TIMEOUT_S = 900  # a cold pip install is a minute or two; slow mirrors get room


class Unavailable(RuntimeError):
    """A tool could not be installed or started (the message says why and where to look)."""


def venv_dir(name: str) -> Path:
    return Path(os.environ.get(env_var(name)) or ROOT / f".venv-{name}")


def env_var(name: str) -> str:
    return f"DINOSEG_{name.upper()}_VENV"


def installed_version(python: Path, package: str) -> str | None:
    if not python.exists():
        return None
    done = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.stdout.strip() if done.returncode == 0 else None


def ensure(name: str, package: str, version: str, venv: Path | None = None) -> Path:
    """The python of a virtual environment holding package==version (installed there first when needed)."""
    venv = venv or venv_dir(name)
    python = venv / "bin" / "python"
    if installed_version(python, package) == version:
        return python
    steps = [] if python.exists() else [[sys.executable, "-m", "venv", str(venv)]]
    steps.append(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{package}=={version}"]
    )
    for step in steps:
        try:
            done = subprocess.run(step, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise Unavailable(
                f"`{' '.join(step)}` did not finish in {INSTALL_TIMEOUT_S} s: check access to PyPI, "
                f"or point {env_var(name)} at an environment with {package}=={version}."
            ) from None
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise Unavailable(f"`{' '.join(step)}` failed (exit {done.returncode}):\n{tail}")
    if installed_version(python, package) != version:
        raise Unavailable(f"{venv} does not hold {package}=={version} after installing it: remove {venv} and retry.")
    return python
