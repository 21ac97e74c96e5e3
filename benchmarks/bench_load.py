"""Time `model.hub.load_backbone` on a checkpoint of the given variant (random weights, saved
once under a temporary folder; the file is in the page cache before timing).

    python benchmarks/bench_load.py dinov2_vitl14 dinov2_vits14
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.backbone import build_backbone  # noqa: E402
from model.hub import load_backbone  # noqa: E402


def main(names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        for name in names:
            path = Path(folder) / f"{name}.pth"
            torch.save(build_backbone(name).state_dict(), path)
            torch.load(path, weights_only=True)  # in the page cache
            times = []
            for _ in range(5):
                started = time.perf_counter()
                load_backbone(name, str(path))
                times.append(time.perf_counter() - started)
            print(f"{name}: load_backbone median {statistics.median(times):.3f} s over {len(times)}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["dinov2_vits14", "dinov2_vitl14"])
