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
import time

from segment_cost import become_subreaper  # benchmarks/ is the script's folder

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def pids() -> set[str]:
    return {p for p in os.listdir("/proc") if p.isdigit()}


def read(pid: str) -> tuple[str, str, str, float] | None:
    """(parent pid, comm, command line, user + system CPU seconds) of a process, or None once it is
    gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[1], comm, args, (int(fields[11]) + int(fields[12])) / TICK


def role(comm: str, args: str, command: list[str]) -> str:
    if comm.startswith("ray::"):  # ray::IDLE and ray::MapBatches(...) are task workers
        return "task workers" if comm in ("ray::IDLE",) or comm.startswith("ray::MapBatches") else comm
    for name in ("raylet", "gcs_server", "log_monitor", "dashboard", "runtime_env"):
        if name in args:
            return f"ray: {name}"
    if args.strip() == " ".join(command):
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
    me = str(os.getpid())
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ours, last = {str(child.pid)}, {}
    while child.poll() is None:
        for pid in sorted(pids(), key=int):  # a parent is (almost always) numbered before its child
            seen = read(pid)
            if seen is not None and (pid in ours or seen[0] in ours or (seen[0] == me and pid != me)):
                ours.add(pid)
                last[pid] = seen[1:]
        time.sleep(0.2)
    roles: collections.Counter[str] = collections.Counter()
    for comm, cmdline, cpu in last.values():
        roles[role(comm, cmdline, command)] += cpu
    print(f"exit status {child.returncode}; CPU s by role (total {sum(roles.values()):.2f}):")
    for name, cpu in roles.most_common():
        if cpu >= 0.05:
            print(f"{cpu:8.2f}  {name}")


if __name__ == "__main__":
    main()
