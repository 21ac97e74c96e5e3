"""What bench_segment.py needs beside the model: the CPU time and memory of a job's whole process
tree, the FLOPs of a ViT forward pass and the cores that keep a GPU fed, and the plain loop a new
user writes around Meta's inference (issue 17).

CPU time of a process tree (user + system, all threads), processes that exit mid-run included:
this process becomes a *child subreaper* (prctl PR_SET_CHILD_SUBREAPER), so a process of a job's
tree whose parent exits first (Ray's raylet and GCS when the driver shuts Ray down, say) is
re-parented to it instead of init. When the job's root exits, `wait_tree` reaps it with os.wait4,
whose rusage holds the root's CPU time plus that of every descendant it, or a descendant, waited
for; then it waits for the adopted orphans and reaps them the same way. One kind of process
escapes every rusage: a child of a parent that ignores SIGCHLD is reaped by the kernel, and its
time is added to no one's. Ray's raylet ignores SIGCHLD, so every Ray worker is such a child.
`TreeSampler` reads /proc/PID/stat of each process of the tree every 0.2 s and keeps the last
figures per process; for the children of SIGCHLD-ignoring parents (not reaped by this process) it
adds their last utime + stime + cutime + cstime to the rusages. Only the last <= 0.2 s of those
processes is missed (and a process that lives less than the 1 s between scans of the tree's
membership): at the workers' exit, the same for two job sizes, so it cancels in a steady-state
difference. The sum of the last utime + stime seen for every process is kept as a
cross-check from below.

    python benchmarks/segment_cost.py loop INPUT OUTPUT HEAD [--device cpu] [--resolution 512]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from machine import GpuUtilisation, NoSampler

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def become_subreaper() -> bool:
    """Adopt the orphans of this process's descendants (Linux); False where the call is refused."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


# ---- /proc -----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name: fields[1] ppid, [11] utime, [12] stime, [19] start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))):
            parents.setdefault(int(fields[1]), []).append(int(entry))
    return parents


def adopted(exclude: set[int]) -> list[int]:
    """This process's children other than `exclude`: during a spawn, the orphans it adopted."""
    return [p for p in _children_map().get(os.getpid(), []) if p not in exclude]


def proc_tree(roots: list[int], children: dict[int, list[int]] | None = None) -> list[int]:
    """`roots` and all their descendants, each root before its descendants."""
    children = _children_map() if children is None else children
    tree, stack = [], list(reversed(roots))
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL a process we started and everything below it, by pid."""
    for p in reversed(proc_tree([pid])):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


SIGCHLD_BIT = 1 << (17 - 1)  # SigIgn in /proc/PID/status is a mask of signals 1..64; SIGCHLD is 17


def ignores_sigchld(pid: int) -> bool:
    """Whether `pid` ignores SIGCHLD: the kernel then reaps its children at exit, and their CPU
    time reaches no one's rusage (Ray's raylet does this to its workers)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigIgn:"):
                return bool(int(line.split()[1], 16) & SIGCHLD_BIT)
    except (OSError, ValueError, IndexError):
        pass
    return False


@dataclass
class _Seen:
    own: int  # utime + stime, ticks
    inclusive: int  # plus cutime + cstime (its reaped children)
    auto_reaped: bool  # its parent ignores SIGCHLD


class TreeSampler(threading.Thread):
    """Peak RSS of a process, peak summed RSS / PSS of its tree (with the orphans this process
    adopted from it), and the last CPU times seen per process, from /proc.

    RSS (statm) and CPU times every `interval` s; the tree's membership every `tree_interval` s;
    PSS (smaps_rollup, ~40 ms for a Ray tree) every `pss_interval` s. psutil is not a dependency.
    The sampler runs at nice 0 beside Ray's workers (nice 15): it is kept to a few % of one core."""

    def __init__(self, pid: int, exclude: set[int], interval=0.2, tree_interval=1.0, pss_interval=2.0):
        super().__init__(daemon=True)
        self.pid, self.exclude = pid, exclude
        self.interval, self.tree_interval, self.pss_interval = interval, tree_interval, pss_interval
        self.driver = self.tree_rss = self.tree_pss = 0  # KiB
        self.processes = 0
        self.seen: dict[tuple[int, str], _Seen] = {}  # by (pid, start time): pids get reused
        self._page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
        self._done = threading.Event()

    def _rss(self, pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self._page_kib
        except (OSError, ValueError, IndexError):
            return 0

    def _members(self) -> tuple[list[int], set[int]]:
        """The tree's pids, and those of its parents that ignore SIGCHLD."""
        children = _children_map()
        orphans = [p for p in children.get(os.getpid(), []) if p != self.pid and p not in self.exclude]
        pids = proc_tree([self.pid, *orphans], children)
        return pids, {p for p in pids if p in children and ignores_sigchld(p)}

    def _cpu(self, pids: list[int], ignoring: set[int]) -> None:
        for pid in pids:
            f = _stat_fields(pid)
            if f and len(f) > 19:
                own = int(f[11]) + int(f[12])
                self.seen[(pid, f[19])] = _Seen(own, own + int(f[13]) + int(f[14]), int(f[1]) in ignoring)

    def run(self):
        pids: list[int] = []
        ignoring: set[int] = set()
        last_tree = last_pss = -1e9
        while not self._done.is_set():
            now = time.monotonic()
            if now - last_tree >= self.tree_interval:
                last_tree, (pids, ignoring) = now, self._members()
                self.processes = max(self.processes, len(pids))
            self._cpu(pids, ignoring)
            sizes = [self._rss(pid) for pid in pids]
            if pids:
                self.driver = max(self.driver, sizes[0])  # the root comes first
            self.tree_rss = max(self.tree_rss, sum(sizes))
            if now - last_pss >= self.pss_interval:
                last_pss = now
                self.tree_pss = max(self.tree_pss, sum(_kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids))
            self._done.wait(self.interval)

    def stop(self, reaped: set[int]) -> dict:
        """The figures; `reaped`: the pids this process reaped (their CPU is in wait4's rusage)."""
        self._done.set()
        self.join()
        tick = os.sysconf("SC_CLK_TCK")
        auto = [s for (pid, _), s in self.seen.items() if s.auto_reaped and pid not in reaped]
        return {
            "driver_mib": self.driver / 1024,
            "tree_rss_mib": self.tree_rss / 1024,
            "tree_pss_mib": self.tree_pss / 1024,
            "processes": self.processes,
            "cpu_sampled_s": sum(s.own for s in self.seen.values()) / tick,
            "cpu_auto_reaped_s": sum(s.inclusive for s in auto) / tick,
            "auto_reaped": len(auto),
        }


@dataclass
class TreeExit:
    returncode: int | None  # None: killed after the timeout
    cpu_s: float  # user + system of the root and of every descendant reaped by a waiter (os.wait4 rusage)
    reaped: set[int]  # the root and the orphans of its tree that this process adopted and reaped
    lingered_s: float  # how long the adopted orphans outlived the root
    exited: float  # time.perf_counter() when the root was reaped


def _cpu(rusage) -> float:
    return rusage.ru_utime + rusage.ru_stime


def wait_tree(pid: int, exclude: set[int], timeout: float, linger: float = 30.0) -> TreeExit:
    """Wait for the child `pid` (at most `timeout` s, then its tree is killed), reap it with
    os.wait4, then wait for the orphans of its tree that this subreaper adopted (at most `linger`
    s, then they are killed) and reap them too, summing their rusages."""
    deadline = time.monotonic() + timeout
    returncode = None
    while True:
        done, status, rusage = os.wait4(pid, os.WNOHANG)
        if done:
            returncode = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() > deadline:
            for orphan in adopted(exclude | {pid}):
                kill_tree(orphan)
            kill_tree(pid)
            _, _, rusage = os.wait4(pid, 0)
            break
        time.sleep(0.05)
    exited = time.perf_counter()
    cpu, reaped, ended = _cpu(rusage), {pid}, time.monotonic()
    stop_at = ended + linger
    while left := adopted(exclude):
        for orphan in left:
            done, _, rusage = os.wait4(orphan, os.WNOHANG)
            if done:
                cpu += _cpu(rusage)
                reaped.add(orphan)
        if time.monotonic() > stop_at:
            for orphan in left:
                kill_tree(orphan)
        time.sleep(0.05)
    return TreeExit(returncode, cpu, reaped, time.monotonic() - ended, exited)


class ChildFailed(RuntimeError):
    """A subprocess failed or hung; the message ends with its log's tail."""


def child_env(code: Path) -> dict:
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(code)}


def run_tree(cmd: list[str], log: Path, timeout: float, code: Path, gpu: int | None = None) -> dict:
    """Run `cmd` (cwd and PYTHONPATH: `code`), sampling its process tree; the wall time from spawn
    to exit, the tree's exact CPU time (wait_tree) and memory. A command still running after
    `timeout` s (a starved Ray Data graph hangs without a word) is killed with its tree."""
    exclude = set(adopted(set()))  # children this process had before: none of them is the job's
    util = GpuUtilisation(gpu) if gpu is not None else None
    with open(log, "w") as out, util or NoSampler():
        if util and util.proc:
            exclude.add(util.proc.pid)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=code, env=child_env(code), stdout=out, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, exclude)
        sampler.start()
        ended = wait_tree(proc.pid, exclude, timeout)
        proc.returncode = -9 if ended.returncode is None else ended.returncode  # reaped by wait_tree
        memory = sampler.stop(ended.reaped)
    tail = log.read_text(errors="replace")[-4000:]
    if ended.returncode is None:
        raise ChildFailed(f"{log.stem} ran past {timeout:.0f} s and was killed (a hang?); the end of {log}:\n{tail}")
    if ended.returncode != 0:
        last = next((ln.strip() for ln in reversed(tail.splitlines()) if ln.strip()), "")[:300]
        raise ChildFailed(f"{log.stem} failed (exit {ended.returncode}): {last}; the end of {log}:\n{tail}")
    out = {
        "process_wall": ended.exited - t0,
        "memory": memory,
        # wait4's rusages, plus what the sampler last saw of the processes the kernel reaped itself
        "cpu_s": ended.cpu_s + memory["cpu_auto_reaped_s"],
        "orphans": len(ended.reaped) - 1,
    }
    return out | ({"gpu": util.summary()} if util else {})


# ---- FLOPs and the cores one GPU needs -------------------------------------------------------

# embed dim, depth (DESIGN.md's DINOv2 facts); patch 14, MLP ratio 4, no registers
VITS = {"vits14": (384, 12), "vitl14": (1024, 24)}
PATCH = 14
HEAD_CLASSES = 150  # Meta's ADE20K linear head: what a cluster run uses


def vit_flops(dim: int, depth: int, side: int = 518, classes: int = HEAD_CLASSES) -> float:
    """FLOPs (2 per multiply-add) of one side x side image through a DINOv2 ViT/14 and a linear
    head: the patch embedding, per block the qkv / proj / MLP matmuls and attention's two N x N x D
    products, then the head's 1x1 conv; norms, softmax and GELU are left out (well under 1%)."""
    patches = (side // PATCH) ** 2
    n = 1 + patches  # CLS + patch tokens
    embed = 2 * patches * 3 * PATCH * PATCH * dim
    matmuls = 2 * n * dim * (3 * dim + dim + 2 * 4 * dim)  # qkv, proj, fc1 + fc2
    attention = 2 * 2 * n * n * dim  # q @ k^T and attn @ v
    head = 2 * patches * dim * classes
    return float(embed + depth * (matmuls + attention) + head)


FLOPS_FORMULA = (
    "FLOPs/img = 2*P*(3*14*14)*D + depth*(2*N*D*(3D + D + 8D) + 4*N^2*D) + 2*P*D*C, "
    "P = 37*37 patches, N = P + 1 tokens at 518, C = 150 classes; "
    "GPU img/s = peak TFLOP/s * 1e12 * MFU / FLOPs/img; cores = GPU img/s * non-model core-ms/img / 1000"
)


def parse_rates(text: str | None) -> dict[str, float]:
    """'vits14=2400,vitl14=310' -> {'vits14': 2400.0, 'vitl14': 310.0} (GPU img/s measured at 518 bf16)."""
    rates = {}
    for part in filter(None, (text or "").split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in VITS or not value:
            raise SystemExit(f"--gpu-rate {text!r}: write e.g. vits14=2400,vitl14=310 (models: {', '.join(VITS)}).")
        rates[name.strip()] = float(value)
    return rates


def cores_per_gpu(core_ms: float, rates: dict[str, float], peak_tflops: float, mfu: float) -> list[dict]:
    """For each ViT: its FLOPs at 518, the GPU's img/s (measured, or peak x MFU / FLOPs) and the
    cores whose non-model work at `core_ms` per image keeps up with it."""
    rows = []
    for name, (dim, depth) in VITS.items():
        flops = vit_flops(dim, depth)
        measured = name in rates
        rate = rates[name] if measured else peak_tflops * 1e12 * mfu / flops
        rows.append(
            {
                "model": name,
                "gflops": flops / 1e9,
                "gpu_img_s": rate,
                "source": "measured (--gpu-rate)" if measured else f"{peak_tflops:g} TFLOP/s x MFU {mfu:g}",
                "cores": rate * core_ms / 1000,
            }
        )
    return rows


# ---- the loop a new user writes --------------------------------------------------------------


def user_loop(input_dir: str, output_dir: str, head_path: str, device: str, resolution: int) -> int:
    """What a user writes around Meta's dense inference, one image at a time: PIL decode, resize
    the short side to `resolution`, normalise, centre-pad to a multiple of 14, backbone + head,
    logits bilinearly to the original size, argmax, PNG by PIL. Our model/ backbone and head
    (parity-exact with Meta's), random backbone weights as the benchmark's job uses."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from model.hub import load_backbone, load_head

    loaded = load_head(head_path)
    backbone = load_backbone(loaded.backbone, "random").to(device).eval()
    head = loaded.head.to(device).eval()
    layers = list(head.config.layers)
    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(3, 1, 1)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    use_bf16 = device.startswith("cuda")
    for path in sorted(Path(input_dir).iterdir()):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        img_r = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.array(img_r)).to(device).permute(2, 0, 1).float().div_(255)
        x = (x - mean) / std
        ph, pw = (-x.shape[1]) % PATCH, (-x.shape[2]) % PATCH
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=use_bf16):
            features = backbone.get_intermediate_layers(x[None], n=layers, reshape=True, norm=True)
            logits = head(features).float()
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            mask = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
        Image.fromarray(mask).save(out / f"{path.stem}.png")
    return 0


def compare_user(
    folder: Path, head: Path, resolution: int, device: str, workdir: Path, code: Path, timeout: float, gpu=None
) -> dict:
    """A new user's two ways over the images in `folder`, each from spawn to exit: the whole
    command at its default inference settings (the head's resolution), and `user_loop`."""
    n = len(list(folder.iterdir()))
    runs = {}
    for name, out in (("command", workdir / "out_command"), ("loop", workdir / "out_loop")):
        shutil.rmtree(out, ignore_errors=True)
        if name == "command":
            cmd = [sys.executable, "-m", "jobs.segment", str(folder), str(out), "--head", str(head)]
            cmd += ["--backbone-weights", "random", "--device", device]
            masks = out / "masks"
        else:
            cmd = [sys.executable, str(Path(__file__).resolve()), "loop", str(folder), str(out), str(head)]
            cmd += ["--device", device, "--resolution", str(resolution)]
            masks = out
        runs[name] = run_tree(cmd, workdir / f"{name}.log", timeout, code, gpu)
        written = len(list(masks.glob("*.png"))) if masks.exists() else 0
        if written != n:
            raise ChildFailed(f"the {name} wrote {written} of {n} masks: see {workdir / f'{name}.log'}")
    return {"n": n, **runs}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="the plain loop of bench_segment.py's new-user comparison")
    p.add_argument("what", choices=["loop"])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("head")
    p.add_argument("--device", default="cpu")
    p.add_argument("--resolution", type=int, default=512)
    args = p.parse_args(argv)
    return user_loop(args.input, args.output, args.head, args.device, args.resolution)


if __name__ == "__main__":
    sys.exit(main())
