"""A real Label Studio for the tests: installed once into a virtual environment of its own
(its Django pins are its own, so never the project's), started once per test session on a free
loopback port, and stopped with its whole process group at the end.

    def test_x(labelstudio):                      # the session fixture (tests/conftest.py)
        project = labelstudio.create_project(config_xml)
        labelstudio.import_tasks(project, [{"data": {"image": url}, "predictions": [...]}])
        labelstudio.export(project)               # Label Studio's JSON export, as a list

Where it lives: `$DINOSEG_LABELSTUDIO_VENV`, default `<repo>/.venv-labelstudio` (git-ignored);
an environment that already holds LABEL_STUDIO_VERSION is used as it is. A Label Studio that
cannot be installed or started fails the tests that need it, with the reason; it never skips them.

Images: tasks reference images by URL. Label Studio 1.23.2 accepts, without network, files
uploaded through `upload_image` (task URLs `/data/upload/<project>/<name>`, served to clients
with the API token), `data:image/png;base64,...` URLs, and http URLs of a loopback server.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests
import side_venv
from side_venv import Unavailable

LABEL_STUDIO_VERSION = "1.23.2"
VENV_NAME = "labelstudio"  # $DINOSEG_LABELSTUDIO_VENV, default <repo>/.venv-labelstudio (see side_venv)
ADMIN_EMAIL = "admin@example.com"
START_TIMEOUT_S = 120  # `label-studio start` answers /health after about 30 s on 2 CPUs
# Label Studio refuses loopback ML backends and webhooks by default (SSRF protection); the
# tests' backend runs on 127.0.0.1, so this instance allows it.
LOOPBACK_ENV = {"ML_BLOCK_LOCAL_IP": "false", "USE_DEFAULT_BANNED_SUBNETS": "false"}


class LabelStudioUnavailable(Unavailable):
    """Label Studio could not be installed or started (the message says why and where to look)."""


def venv_dir() -> Path:
    return side_venv.venv_dir(VENV_NAME)


def ensure_installed(venv: Path | None = None, version: str = LABEL_STUDIO_VERSION) -> Path:
    """The `label-studio` executable of its environment (`tests/side_venv.py`), installing
    label-studio==version there first unless it holds that version. Raises Unavailable."""
    return side_venv.ensure(VENV_NAME, "label-studio", version, venv).parent / "label-studio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LabelStudio:
    """A running Label Studio: its URL, the admin's legacy API token, and the API calls tests use.
    Every call raises for an HTTP error with Label Studio's own message."""

    url: str
    token: str
    password: str = ""
    process: subprocess.Popen | None = None
    log: Path | None = None
    session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self):
        self.session.headers["Authorization"] = f"Token {self.token}"

    # --- plumbing ---------------------------------------------------------------------------

    def api(self, method: str, path: str, **kwargs):
        """`method` /api/`path` with the token; the decoded JSON (None for an empty body)."""
        kwargs.setdefault("timeout", 120)
        r = self.session.request(method, f"{self.url}/api/{path.lstrip('/')}", **kwargs)
        if r.status_code >= 400:
            raise requests.HTTPError(f"{method} /api/{path}: {r.status_code} {r.text[:2000]}", response=r)
        return r.json() if r.content else None

    def log_tail(self, lines: int = 40) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    # --- projects, tasks, annotations -------------------------------------------------------

    def create_project(self, label_config: str, title: str = "dinoseg test") -> int:
        return self.api("POST", "projects", json={"title": title, "label_config": label_config})["id"]

    def import_tasks(self, project: int, tasks: list[dict]) -> dict:
        """Import tasks (`{"data": {...}, "predictions": [{"result": [...], ...}]}`); returns
        Label Studio's summary (task_count, prediction_count...)."""
        return self.api("POST", f"projects/{project}/import", json=tasks)

    def upload_image(self, project: int, name: str, data: bytes, content_type: str = "image/png") -> dict:
        """Upload one image file as a task of its own (Label Studio stores it and the task's
        image is `/data/upload/<project>/<stored name>`); returns the import summary."""
        return self.api("POST", f"projects/{project}/import", files={"file": (name, data, content_type)})

    def tasks(self, project: int) -> list[dict]:
        """Every task of the project (Label Studio's task list, all pages), oldest first."""
        found: list[dict] = []
        page = 1
        while True:
            body = self.api("GET", "tasks", params={"project": project, "page": page, "page_size": 100})
            found += body["tasks"]
            if not body["tasks"] or len(found) >= body["total"]:
                return sorted(found, key=lambda t: t["id"])
            page += 1

    def task(self, task_id: int) -> dict:
        return self.api("GET", f"tasks/{task_id}")

    def create_annotation(self, task_id: int, result: list[dict], **extra) -> dict:
        return self.api("POST", f"tasks/{task_id}/annotations", json={"result": result, **extra})

    def predictions(self, project: int) -> list[dict]:
        """Every prediction object of the project (task id, result, score, model_version...)."""
        return self.api("GET", "predictions", params={"project": project})

    def export(self, project: int, export_type: str = "JSON", all_tasks: bool = True) -> list:
        """Label Studio's export of the project (JSON: a list of tasks with their annotations)."""
        params = {"exportType": export_type, "download_all_tasks": "true" if all_tasks else "false"}
        r = self.session.get(f"{self.url}/api/projects/{project}/export", params=params, timeout=120)
        if r.status_code >= 400:
            raise requests.HTTPError(f"export of project {project}: {r.status_code} {r.text[:2000]}", response=r)
        return r.json()

    # --- ML backends --------------------------------------------------------------------------

    def connect_ml_backend(self, project: int, url: str, title: str = "dinoseg", **extra) -> dict:
        """Connect an ML backend to the project, as the Model settings page does: Label Studio
        checks its /health and calls /setup before it accepts it. Returns the backend object."""
        return self.api("POST", "ml", json={"url": url, "project": project, "title": title, **extra})

    def ml_backends(self, project: int) -> list[dict]:
        return self.api("GET", "ml", params={"project": project})

    def retrieve_predictions(self, project: int, task_ids: list[int] | None = None) -> dict:
        """The data manager's "Retrieve Predictions" action: Label Studio sends the tasks (all of
        them, or `task_ids`) to the project's ML backends and stores what comes back."""
        selected = {"all": False, "included": task_ids} if task_ids else {"all": True, "excluded": []}
        return self.api(
            "POST",
            "dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project},
            json={"selectedItems": selected},
        )

    def interactive_prediction(self, ml_backend: int, task_id: int, context: dict | None = None) -> dict:
        """Ask an interactive ML backend (is_interactive=True) for one task's prediction."""
        return self.api(
            "POST", f"ml/{ml_backend}/interactive-annotating", json={"task": task_id, "context": context or {}}
        )

    # --- life cycle -----------------------------------------------------------------------------

    def enable_legacy_tokens(self) -> None:
        """Since 1.17 legacy tokens are off per organization; the ML backend protocol and these
        helpers use one. Log in through the form (CSRF cookie), then switch them on."""
        browser = requests.Session()
        login = f"{self.url}/user/login/"
        browser.get(login, timeout=30).raise_for_status()
        r = browser.post(
            login,
            data={"email": ADMIN_EMAIL, "password": self.password, "csrfmiddlewaretoken": browser.cookies["csrftoken"]},
            headers={"Referer": login},
            allow_redirects=False,
            timeout=30,
        )
        if r.status_code != 302:
            raise LabelStudioUnavailable(f"logging in to Label Studio as {ADMIN_EMAIL} failed ({r.status_code}).")
        r = browser.post(
            f"{self.url}/api/jwt/settings",
            json={"api_tokens_enabled": True, "legacy_api_tokens_enabled": True},
            headers={"X-CSRFToken": browser.cookies["csrftoken"], "Referer": self.url},
            timeout=30,
        )
        if r.status_code >= 400:
            raise LabelStudioUnavailable(f"enabling legacy API tokens failed: {r.status_code} {r.text[:500]}")

    def stop(self) -> None:
        """End Label Studio's process group (it starts helpers of its own)."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.process = None


def start(data_dir: Path, executable: Path | None = None, port: int | None = None) -> LabelStudio:
    """Start Label Studio on 127.0.0.1 with its data under `data_dir`, wait for /health, enable
    legacy tokens; returns it running (call .stop()). Raises LabelStudioUnavailable."""
    executable = executable or ensure_installed()
    port = port or free_port()
    password, token = secrets.token_urlsafe(12), secrets.token_hex(20)  # a 40-character token
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "label-studio.log"
    env = os.environ | LOOPBACK_ENV | {"LABEL_STUDIO_BASE_DATA_DIR": str(data_dir)}
    argv = [str(executable), "start", "--no-browser", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--username", ADMIN_EMAIL, "--password", password, "--user-token", token]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            argv, env=env, cwd=data_dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    ls = LabelStudio(f"http://127.0.0.1:{port}", token, password, process, log)
    try:
        _wait_healthy(ls)
        ls.enable_legacy_tokens()
    except BaseException:
        ls.stop()
        raise
    return ls


def _wait_healthy(ls: LabelStudio) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if ls.process.poll() is not None:
            raise LabelStudioUnavailable(
                f"label-studio start exited with {ls.process.returncode}; its log ({ls.log}) ends:\n{ls.log_tail()}"
            )
        try:
            r = requests.get(f"{ls.url}/health", timeout=5)
            if r.ok and r.json().get("status") == "UP":
                return
        except (requests.RequestException, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    raise LabelStudioUnavailable(
        f"Label Studio did not answer {ls.url}/health within {START_TIMEOUT_S} s; its log ({ls.log}) ends:\n{ls.log_tail()}"
    )


def decode_brush(rles: list[list[int]], venv: Path | None = None) -> list[np.ndarray]:
    """Label Studio's own decoder of brush RLE (label_studio_sdk's converter, run in Label
    Studio's environment): one flat uint8 RGBA array per RLE, for checks independent of ours."""
    python = (venv or venv_dir()) / "bin" / "python"
    script = (
        "import json, sys\n"
        "from label_studio_sdk.converter.brush import decode_rle\n"
        "print(json.dumps([decode_rle(r).tolist() for r in json.load(sys.stdin)]))\n"
    )
    done = subprocess.run(
        [str(python), "-c", script], input=json.dumps(rles), capture_output=True, text=True, timeout=300
    )
    if done.returncode != 0:
        raise LabelStudioUnavailable(f"Label Studio's brush decoder failed: {done.stderr[-2000:]}")
    return [np.asarray(words, dtype=np.uint8) for words in json.loads(done.stdout)]
