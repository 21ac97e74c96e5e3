"""Text heads (dino.txt): what building one costs, and what segmenting with one costs against
Meta's ADE20K linear head on ViT-L/14 — random weights of the real sizes (nothing downloads).

- build: `model.text_head.build_text_head` for 21 (VOC) and 150 (ADE20K) classes with the
  full-size text tower (1280 wide, 24 blocks, ~0.5 B parameters, 2 GB fp32, memory-mapped),
  CLIP's 80 templates and its chosen 7; seconds, prompts/s and peak RSS of the process;
- segment: `Segmenter.predict` images/s at --resolution (whole mode, fp32 on the CPU) of the
  text head on dinov2_vitl14_reg vs Meta's ade20k linear head on dinov2_vitl14, same images,
  alternated so both see the same machine.

    .venv/bin/python benchmarks/bench_text_head.py [--classes 21,150] [--templates imagenet,clip7]
        [--images 6] [--resolution 448] [--hub /tmp/bench-dinotxt-hub]

Prints a table and a JSON line. The hub folder is written once and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from machine import core_count, cpu_model  # noqa: E402  (benchmarks/ is the script's folder)

VOC = "voc2012"
ADE = "ade20k"


def write_hub(hub: Path) -> None:
    """dino.txt's files at full size, the two ViT-L backbones and Meta's ADE20K linear head, random."""
    import torch
    from dinotxt_files import write_dinotxt_hub
    from hubs import mmseg_head

    from model.backbone import build_backbone
    from model.weights import backbone_file, head_file

    done = hub / ".complete"
    if done.exists():
        return
    write_dinotxt_hub(hub, dim=1024, width=1280, layers=24)
    for name in ("dinov2_vitl14_reg", "dinov2_vitl14"):
        torch.manual_seed(0)
        path = hub / backbone_file(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(build_backbone(name).state_dict(), path)
    torch.save(mmseg_head(150, 1024, 0), hub / head_file("dinov2_vitl14", ADE, "linear"))
    done.write_text("ok")


def build_once(classes: str, templates: str) -> dict:
    """One build in this process (a fresh one per build, so peak RSS is the build's)."""
    from model.text_head import TextHeadRequest, build_text_head

    started = time.perf_counter()
    ckpt = build_text_head(TextHeadRequest(classes, templates=templates), device="cpu")
    seconds = time.perf_counter() - started
    return {
        "classes": len(ckpt.classes),
        "templates": templates,
        "prompts": ckpt.meta["prompts"],
        "seconds": round(seconds, 1),
        "prompts_per_s": round(ckpt.meta["prompts"] / seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def build(hub: Path, classes: str, templates: str) -> dict:
    env = os.environ | {"DINOSEG_HUB": str(hub), "DINOSEG_CACHE": str(hub / "cache")}
    code = (
        "import json, sys; sys.path.insert(0, 'benchmarks'); from bench_text_head import build_once; "
        f"print(json.dumps(build_once({classes!r}, {templates!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def segment(hub: Path, images: int, resolution: int) -> dict:
    import numpy as np
    import torch

    from model.checkpoint import save_head_checkpoint
    from model.hub import build_segmenter
    from model.segmenter import InferenceConfig
    from model.text_head import TextHeadRequest, build_text_head

    os.environ |= {"DINOSEG_HUB": str(hub), "DINOSEG_CACHE": str(hub / "cache")}
    head = hub / "ade20k-text-head.pt"
    if not head.exists():
        save_head_checkpoint(build_text_head(TextHeadRequest(ADE, templates="none"), device="cpu"), str(head))
    config = InferenceConfig(resolution=resolution, precision="fp32")
    text = build_segmenter(head=str(head), config=config, device="cpu")
    linear = build_segmenter("dinov2_vitl14_ade20k_linear", config=config, device="cpu")
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 255, (480, 640, 3), dtype=np.uint8) for _ in range(images)]
    torch.set_num_threads(core_count())
    seconds = {"text": 0.0, "linear": 0.0}
    for model in (text, linear):  # warm-up
        model.predict(batch[:1])
    for image in batch:  # alternate, one image each, so both see the same machine
        for name, model in (("text", text), ("linear", linear)):
            started = time.perf_counter()
            model.predict([image])
            seconds[name] += time.perf_counter() - started
    return {
        "images": images,
        "resolution": resolution,
        "text_img_s": round(images / seconds["text"], 3),
        "linear_img_s": round(images / seconds["linear"], 3),
        "ratio": round(seconds["linear"] / seconds["text"], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", default="21,150")
    parser.add_argument("--templates", default="imagenet,clip7")
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--resolution", type=int, default=448)
    parser.add_argument("--hub", default="/tmp/bench-dinotxt-hub")
    parser.add_argument("--skip-build", action="store_true")
    args = parser.parse_args()
    hub = Path(args.hub)
    write_hub(hub)
    builds = []
    if not args.skip_build:
        for n in args.classes.split(","):
            for templates in args.templates.split(","):
                row = build(hub, VOC if n == "21" else ADE, templates)
                builds.append(row)
                print(
                    f"build {row['classes']:>4} classes x {row['templates']:<8} {row['prompts']:>6} prompts "
                    f"{row['seconds']:>8.1f} s  {row['prompts_per_s']:>7.1f} prompts/s  peak {row['peak_rss_gb']} GB",
                    flush=True,
                )
    seg = segment(hub, args.images, args.resolution)
    print(
        f"segment {seg['images']} images 640x480 @ {seg['resolution']}: text head (ViT-L/14-reg) "
        f"{seg['text_img_s']} img/s, Meta's ADE20K linear (ViT-L/14) {seg['linear_img_s']} img/s"
    )
    print(json.dumps({"machine": {"cpu": cpu_model(), "cores": core_count()}, "build": builds, "segment": seg}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
