"""`ray job submit` end to end: a real Ray head (`ray start --head` on loopback, in a temp dir),
the README's submit commands as written, a loopback S3 endpoint for the bucket, random weights
in a local hub. The head is this test's own and is stopped at the end."""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
from hubs import write_hub
from PIL import Image
from readme import ROOT, command

from pipeline.data.synthetic import write_synthetic

pytestmark = pytest.mark.slow
BUCKET = "my-bucket"  # the README's bucket
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, seconds: float, process: subprocess.Popen, log: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the Ray head exited ({process.returncode}): {Path(log).read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except urllib.error.HTTPError:  # it answers (401 without the token): it is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"nothing answered at {url} within {seconds} s")


@pytest.fixture(scope="module")
def cluster_env(tmp_path_factory, s3_server):
    """The environment of the head and of the `ray` client: the venv first on PATH (the job's
    `python`), a private HOME for Ray's auth token, the weights hub, S3 credentials + endpoint
    (on a cluster, an instance profile and the region)."""
    hub = tmp_path_factory.mktemp("hub")
    write_hub(hub, ["dinov2_vitl14_ade20k_ms", "dinov2_vitb14"])
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "DINOSEG_"))}
    env |= {
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "HOME": str(home),
        # token auth, with a token of this test's (a private HOME has no ~/.ray/auth_token): the
        # head requires it and the job CLI sends it only with RAY_AUTH_MODE=token
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "DINOSEG_HUB": str(hub),
        "DINOSEG_CACHE": str(home / "cache"),
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",  # epochs of a few images: see runtime.start_ray
    }
    return env


@pytest.fixture(scope="module")
def ray_head(cluster_env):
    """`ray start --head --block` in its own process group and temp dir; yields the dashboard URL."""
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard = free_port()
    log = open(f"{temp}.log", "w")
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={free_port()}",
            "--num-cpus=2",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={temp}",
            # not the default 52365, which this session's own Ray agent already holds: a head whose
            # agent cannot bind it takes no jobs ("No available agent to submit job")
            f"--dashboard-agent-listen-port={free_port()}",
            "--disable-usage-stats",
        ],
        env=cluster_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{dashboard}/api/version", 120, head, f"{temp}.log")
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        if head.poll() is None:
            stop_jobs(f"http://127.0.0.1:{dashboard}", cluster_env)
        signal_group(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        signal_group(head.pid, signal.SIGKILL)  # what has not exited by now (Ray's shutdown takes ~30 s)
        head.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
        os.remove(f"{temp}.log")


def stop_jobs(address: str, env: dict) -> None:
    """Stop the jobs still running on the head: Ray starts each job's entrypoint in a session of
    its own, which killing the head's process group would leave running (after a failed test)."""
    script = (
        "import sys, time; from ray.job_submission import JobSubmissionClient\n"
        "c = JobSubmissionClient(sys.argv[1])\n"
        "live = [j.submission_id for j in c.list_jobs() if j.submission_id and not j.status.is_terminal()]\n"
        "[c.stop_job(j) for j in live]\n"
        "end = time.time() + 30\n"
        "while live and time.time() < end and not all(c.get_job_status(j).is_terminal() for j in live): time.sleep(1)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, address], env=env, capture_output=True, text=True, timeout=60)
    if done.returncode:  # the teardown goes on; what may be left running is said
        sys.stderr.write(f"could not stop the head's jobs; a job's driver may still run: {done.stderr[-2000:]}\n")


def signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:  # the group has exited already
        pass


@pytest.fixture(scope="module")
def bucket(s3_server, s3_client):
    s3_client.create_bucket(Bucket=BUCKET)
    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3_server})


def submit(argv: list[str], address: str, env: dict) -> str:
    """Run a README `ray job submit` command from the checkout; returns the job's log after
    checking that the job SUCCEEDED."""
    assert argv[:2] == ["ray", "job"]
    env = env | {"RAY_ADDRESS": address}
    deadline = time.time() + 60
    while True:
        done = subprocess.run(
            [str(BIN / "ray"), *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=480
        )
        output = plain(done.stdout + done.stderr)
        # the dashboard can answer before the head's job agent has registered; the job was not
        # created then, so submitting again is what the message asks for
        if "No available agent to submit job" not in output or time.time() > deadline:
            break
        time.sleep(3)
    job = re.search(r"Job '(raysubmit_\w+)'", output)
    assert done.returncode == 0 and job, output[-3000:]
    status = subprocess.run([str(BIN / "ray"), "job", "status", job[1]], env=env, capture_output=True, text=True)
    assert f"Job '{job[1]}' succeeded" in plain(status.stdout + status.stderr), output[-3000:]  # asked anew
    return output


def plain(text: str) -> str:
    """The CLI's output without its colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def jpeg(seed: int, w: int = 72, h: int = 56) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def test_submit_segment_to_a_local_head(ray_head, cluster_env, bucket):
    bucket.pipe(
        {
            f"{BUCKET}/photos/a.jpg": jpeg(0),
            f"{BUCKET}/photos/sub/b.jpg": jpeg(1, 40, 64),
            f"{BUCKET}/photos/broken.jpg": b"not an image",
        }
    )
    argv = command("ray job submit --working-dir . -- python -m jobs.segment")
    submit(argv, ray_head, cluster_env)
    out = argv[argv.index("jobs.segment") + 2].removeprefix("s3://").rstrip("/")
    # the README's model, its weights from the hub the job was given (DINOSEG_HUB reached the actors)
    assert json.loads(bucket.cat(f"{out}/run.json"))["model"] == argv[argv.index("--model") + 1]
    with bucket.open(f"{out}/masks/sub/b.png") as f:
        assert Image.open(f).size == (40, 64)  # the input's size
    assert bucket.exists(f"{out}/masks/a.png") and not bucket.exists(f"{out}/masks/broken.png")
    errors = pq.read_table(bucket.open(bucket.glob(f"{out}/errors/*.parquet")[0])).to_pylist()
    assert [(e["key"], e["stage"]) for e in errors] == [("broken", "decode")]


def test_submit_train_to_a_local_head(ray_head, cluster_env, bucket, tmp_path):
    argv = command("ray job submit --working-dir . -- python -m jobs.train")
    images, masks = (argv[argv.index("jobs.train") + i].removeprefix("s3://").rstrip("/") for i in (1, 2))
    classes = argv[argv.index("--classes") + 1].removeprefix("s3://")
    output_url = argv[argv.index("--output") + 1].removeprefix("s3://")
    # four pairs: --val-fraction's split keeps three for the two workers (the job's cost is the
    # backbone's features at the default resolution, per image)
    write_synthetic(str(tmp_path), train=4, val=0, size=56, seed=2)
    files = {f"{images}/{p.name}": p.read_bytes() for p in (tmp_path / "train" / "images").iterdir()}
    files |= {f"{masks}/{p.name}": p.read_bytes() for p in (tmp_path / "train" / "masks").iterdir()}
    bucket.pipe(files | {classes: (tmp_path / "classes.yaml").read_bytes()})
    submit(argv, ray_head, cluster_env)
    assert {"head.pt", "last.pt", "metrics.jsonl", "train.json"} <= {
        p.rsplit("/", 1)[-1] for p in bucket.ls(output_url)
    }
    info = json.loads(bucket.cat(f"{output_url}/train.json"))
    assert info["workers"] == int(argv[argv.index("--workers") + 1])
    assert info["epochs_done"] == int(argv[argv.index("--epochs") + 1]) and info["best"] is not None
