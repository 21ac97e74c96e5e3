"""Driver start-up (issue 17): `build_segmenter` (what the driver did) against
`describe_segmenter` (what it does now), each in a fresh process, so every import and one-time
cost a driver pays is in the figure.

Per backbone (ViT-S/14 and ViT-L/14 by default) the script writes, under a temporary folder, a
weights file in Meta's layout (uninitialised tensors of the right shapes: the contents do not
matter to either call) and a 150-class dinoseg linear head on its last block. Cases:

* `file`: `--backbone-weights` that file (read once beforehand, so it is in the page cache);
* `bf16`: the same tensors saved as bfloat16 (the build casts them to float32);
* `random`: `--backbone-weights random` (the build initialises the backbone; nothing to check).

For each (backbone, case, call) a subprocess imports torch and dinoseg, then times the one call;
it reports that wall time, its CPU time (all threads; less sensitive than the wall time to a
busy machine), the process's peak RSS (getrusage) and how much of it the call added
over the peak after the imports, and whether torch._dynamo got imported (the meta-device build
does: about 4 s here).

    .venv/bin/python benchmarks/bench_startup.py                         # the table (about 1-2 min)
    .venv/bin/python benchmarks/bench_startup.py --cases file random bf16 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = ("file", "bf16", "random")
CALLS = ("build", "describe")


def child(call: str, head: str, weights: str) -> None:
    """One measured call in this process; prints its figures as one JSON line."""
    import resource
    import time

    import torch  # noqa: F401  (imported before timing: both calls need it, a driver has it)

    from model.describe import describe_segmenter
    from model.hub import build_segmenter

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started, cpu = time.perf_counter(), time.process_time()
    if call == "build":
        build_segmenter(head=head, backbone_weights=weights, device="cpu")
    else:
        describe_segmenter(head=head, backbone_weights=weights)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    figures = {"seconds": seconds, "cpu_s": cpu, "peak_mb": peak / 1024, "added_mb": (peak - before) / 1024}
    print(json.dumps(figures | {"dynamo": "torch._dynamo" in sys.modules}))


def write_files(folder: Path, name: str, cases: list[str]) -> dict[str, str]:
    """The head and the weights files the cases need of one backbone; returns {case: backbone_weights}."""
    import torch

    from model.backbone import backbone_config
    from model.checkpoint import HeadCheckpoint, save_head_checkpoint
    from model.classes import bundled
    from model.describe import backbone_shapes
    from model.heads import HeadConfig, LinearHead

    cfg = backbone_config(name)
    head = LinearHead(HeadConfig("linear", (cfg.depth - 1,), cfg.embed_dim, 150))
    save_head_checkpoint(
        HeadCheckpoint(name, head.config, bundled("ade20k"), head.state_dict()), str(folder / "head.pt")
    )
    shapes = backbone_shapes(cfg)
    for case, dtype in (("file", torch.float32), ("bf16", torch.bfloat16)):
        if case not in cases:
            continue
        torch.save({k: torch.empty(s, dtype=dtype) for k, s in shapes.items()}, folder / f"{case}.pth")
        with open(folder / f"{case}.pth", "rb") as f:  # into the page cache: a warm file, both calls alike
            while f.read(64 << 20):
                pass
    return {"file": str(folder / "file.pth"), "bf16": str(folder / "bf16.pth"), "random": "random"}


def measure(call: str, head: str, weights: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DINOSEG_HUB": "/nonexistent-hub"}  # nothing fetched
    out = subprocess.run(
        [sys.executable, __file__, "--_child", call, head, weights],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["dinov2_vits14", "dinov2_vitl14"])
    p.add_argument("--cases", nargs="+", default=["file", "random"], choices=CASES)
    p.add_argument("--repeats", type=int, default=1, help="processes per cell; the median is shown")
    p.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        child(*args._child)
        return 0
    from machine import core_count, cpu_model

    print(f"machine: {cpu_model()}, {core_count()} cores; one fresh process per call, median of {args.repeats}")
    columns = [
        "backbone",
        "weights",
        "call",
        "wall of the call",
        "CPU of the call",
        "peak RSS",
        "RSS added by the call",
    ]
    columns.append("torch._dynamo imported")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
            weights = write_files(Path(tmp), name, args.cases)
            head = str(Path(tmp) / "head.pt")
            for case in args.cases:
                for call in CALLS:
                    runs = [measure(call, head, weights[case]) for _ in range(args.repeats)]
                    med = {
                        k: statistics.median(r[k] for r in runs) for k in ("seconds", "cpu_s", "peak_mb", "added_mb")
                    }
                    print(
                        f"| {name} | {case} | {call} | {med['seconds']:.3f} s | {med['cpu_s']:.3f} s | {med['peak_mb']:.0f} MB "
                        f"| {med['added_mb']:.0f} MB | {'yes' if runs[0]['dynamo'] else 'no'} |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
