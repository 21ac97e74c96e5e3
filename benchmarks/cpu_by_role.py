"""CPU seconds of a command's processes, grouped by role (the driver, the Ray actors by class, the
task workers, Ray's own processes), read from /proc every 0.2 s while the command runs.

Run it at two input sizes and subtract to get core-ms per image by role (RESULTS.md, issue 17):

    python benchmarks/cpu_by_role.py -- .venv/bin/python -m jobs.segment IN_40 OUT40 --head H \\
        --backbone-weights random --resolution 112 --device cpu --batch-size 8

Only the command's descendants are counted (this process adopts their orphans, as a subreaper). A process that exits between
two readings loses its last 0.2 s, so the total is below an exit-rusage count (bench_segment's
"CPU s (tree)"). Linux only.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess

from segment_cost import TreeSampler, become_subreaper  # benchmarks/ is the script's folder


class RoleSampler(TreeSampler):
    """TreeSampler (the tree with its adopted orphans, the last CPU times per process), plus each
    process's comm and command line as last seen (a Ray worker renames itself after start-up)."""

    def __init__(self, pid: int):
        super().__init__(pid, exclude=set(), tree_interval=0.2, pss_interval=1e9)
        self.names: dict[int, tuple[str, str]] = {}

    def _cpu(self, pids, ignoring) -> None:
        super()._cpu(pids, ignoring)
        for pid in pids:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            self.names[pid] = comm, args


def role(comm: str, args: str, command: list[str]) -> str:
    if comm.startswith("ray::"):  # ray::IDLE and ray::MapBatches(...) are task workers
        return "task workers" if comm == "ray::IDLE" or comm.startswith("ray::MapBatches") else comm
    for name in ("raylet", "gcs_server", "log_monitor", "dashboard", "runtime_env"):
        if name in args:
            return f"ray: {name}"
    if args == " ".join(command):
        return "driver"
    return f"other: {comm}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("cpu_by_role.py: give the command to measure after --, e.g. -- python -m jobs.segment IN OUT")
    become_subreaper()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sampler = RoleSampler(child.pid)
    sampler.start()
    child.wait()
    sampler.stop(reaped={child.pid})
    tick = os.sysconf("SC_CLK_TCK")
    roles: collections.Counter[str] = collections.Counter()
    for (pid, _), seen in sampler.seen.items():
        roles[role(*sampler.names.get(pid, ("?", "")), command)] += seen.own / tick
    print(f"exit status {child.returncode}; CPU s by role (total {sum(roles.values()):.2f}):")
    for name, cpu in roles.most_common():
        if cpu >= 0.05:
            print(f"{cpu:8.2f}  {name}")


if __name__ == "__main__":
    main()
