"""Benchmark: frozen DINOv2 backbone + linear head, ours vs transformers' Dinov2Model (issue 2).

Both sides run the same random weights and do the same work per image:

* ours: `Segmenter.forward(x)` on a pre-normalised tensor, i.e.
  `backbone.get_intermediate_layers(x, n=head.config.layers, reshape=True, norm=True)` -> LinearHead;
* HF:   `Dinov2Model(x).last_hidden_state` (final layernorm applied) -> drop CLS -> reshape to
  (B, D, h, w) -> the same LinearHead instance.

Both run under the same `model.device.autocast` context for bf16/fp16 (weights stay fp32), in
`torch.inference_mode()`. Every cell (model, size, precision, batch) times ours and HF back to back,
alternating which goes first, so the ratio is measured side by side on a noisy machine; the
reported figure is the median time per iteration -> images/s.

GFLOPs per image are `model.backbone.count_flops` (matmuls + attention, multiply-adds counted x2)
plus the head's 1x1 conv (also x2); layer norms, softmax, GELU, BatchNorm are not counted. The matmul
peak is measured in the same run (large square matmul per dtype, best of several) and the last
column is achieved TFLOP/s / that peak of the same dtype.

    python benchmarks/bench_backbone.py                     # the CPU table of the issue (~5 min on 2 cores)
    python benchmarks/bench_backbone.py --quick             # smoke run, < 1 min
    python benchmarks/bench_backbone.py --device cuda --models dinov2_vits14,dinov2_vitl14 \
        --precisions fp32,bf16,fp16 --out gpu.md

Exit status 1 when ours and HF disagree (max abs diff of the logits at 518 > --tol).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model.backbone import BackboneConfig, DinoVisionTransformer, build_backbone, count_flops  # noqa: E402
from model.classes import ClassMap, default_color  # noqa: E402
from model.device import PRECISIONS, autocast, choose_device  # noqa: E402
from model.errors import DinosegError  # noqa: E402
from model.heads import HeadConfig, LinearHead, default_layers  # noqa: E402
from model.segmenter import InferenceConfig, Segmenter  # noqa: E402

NUM_CLASSES = 21
CHECK_SIZE = 518  # the released position grid (37x37): neither side interpolates, outputs must agree


# ---- machine ---------------------------------------------------------------------------------
from machine import core_count, cpu_flags, cpu_model  # noqa: E402  (benchmarks/ is the script's folder)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- models ----------------------------------------------------------------------------------


def randomise(backbone: DinoVisionTransformer, head: LinearHead, seed: int) -> None:
    """Random weights that make every part count (the default LayerScale 1e-5 would let the
    blocks vanish and the equality check prove little)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.copy_(torch.empty_like(p).uniform_(0.1, 1.0, generator=g))
            elif name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        head.bn.running_mean.copy_(0.1 * torch.randn(head.bn.running_mean.shape, generator=g))
        head.bn.running_var.copy_(1 + 0.5 * torch.rand(head.bn.running_var.shape, generator=g))
        head.bn.weight.copy_(1 + 0.1 * torch.randn(head.bn.weight.shape, generator=g))
        head.bn.bias.copy_(0.1 * torch.randn(head.bn.bias.shape, generator=g))


def meta_to_hf(sd: dict[str, torch.Tensor], config: BackboneConfig) -> dict[str, torch.Tensor]:
    """Our (Meta's) state dict -> transformers >= 5 `Dinov2Model` names (the inverse of model.convert)."""
    out = {
        "embeddings.cls_token": sd["cls_token"],
        "embeddings.mask_token": sd["mask_token"],  # (1, D) on both sides
        "embeddings.position_embeddings": sd["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
        "layernorm.weight": sd["norm.weight"],
        "layernorm.bias": sd["norm.bias"],
    }
    for n in range(config.depth):
        src, dst = f"blocks.{n}.", f"encoder.layer.{n}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.qkv.{kind}"].chunk(3, dim=0)  # qkv rows are stacked q, k, v
            out[f"{dst}attention.q_proj.{kind}"] = q
            out[f"{dst}attention.k_proj.{kind}"] = k
            out[f"{dst}attention.v_proj.{kind}"] = v
            out[f"{dst}attention.o_proj.{kind}"] = sd[f"{src}attn.proj.{kind}"]
            out[f"{dst}norm1.{kind}"] = sd[f"{src}norm1.{kind}"]
            out[f"{dst}norm2.{kind}"] = sd[f"{src}norm2.{kind}"]
            if config.ffn == "swiglu":
                gate, up = sd[f"{src}mlp.w12.{kind}"].chunk(2, dim=0)  # ours: gate, value = w12(x).chunk(2)
                out[f"{dst}mlp.gate_proj.{kind}"] = gate
                out[f"{dst}mlp.up_proj.{kind}"] = up
                out[f"{dst}mlp.down_proj.{kind}"] = sd[f"{src}mlp.w3.{kind}"]
            else:
                out[f"{dst}mlp.fc1.{kind}"] = sd[f"{src}mlp.fc1.{kind}"]
                out[f"{dst}mlp.fc2.{kind}"] = sd[f"{src}mlp.fc2.{kind}"]
        out[f"{dst}layer_scale1.lambda1"] = sd[f"{src}ls1.gamma"]
        out[f"{dst}layer_scale2.lambda1"] = sd[f"{src}ls2.gamma"]
    return {k: v.detach().clone() for k, v in out.items()}


def build_hf(backbone: DinoVisionTransformer, device: torch.device):
    from transformers import Dinov2Config, Dinov2Model

    c = backbone.config
    if c.num_register_tokens:
        raise SystemExit(
            f"{c.name}: register variants need Dinov2WithRegistersModel, which this benchmark does not map."
        )
    hf_config = Dinov2Config(
        hidden_size=c.embed_dim,
        num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads,
        mlp_ratio=int(c.mlp_ratio),
        patch_size=c.patch_size,
        image_size=c.pos_grid * c.patch_size,
        layer_norm_eps=1e-6,
        use_swiglu_ffn=c.ffn == "swiglu",
        qkv_bias=True,
    )
    hf = Dinov2Model(hf_config)  # default attention implementation (sdpa where available)
    hf.load_state_dict(meta_to_hf(backbone.state_dict(), c), strict=True)
    return hf.to(device).eval().requires_grad_(False)


class HFSegmenter(torch.nn.Module):
    """transformers' backbone under the same head and autocast as `Segmenter.forward`."""

    def __init__(self, hf, head: LinearHead, patch_size: int, device: torch.device, precision: str):
        super().__init__()
        self.hf, self.head, self.patch_size = hf, head, patch_size
        self.device, self.precision = device, precision

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        h, w = height // self.patch_size, width // self.patch_size
        with autocast(self.device, self.precision):
            tokens = self.hf(pixel_values=x).last_hidden_state[:, 1:]  # final layernorm applied; drop CLS
            features = tokens.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
            return self.head([features]).float()


def head_flops(head: LinearHead, height: int, width: int, patch: int) -> float:
    """The 1x1 conv, multiply-adds x2 (BatchNorm not counted)."""
    return 2.0 * (height // patch) * (width // patch) * head.config.in_channels * head.config.num_classes


# ---- timing ----------------------------------------------------------------------------------


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, min_time: float) -> float:
    """Best achieved TFLOP/s of an n x n by n x n matmul in `dtype`, without autocast.

    It goes through `F.linear` (a @ b.T), the kernel the model's Linear layers use: on a CPU without
    native bf16 `torch.mm` in bf16 takes a much slower path than `F.linear`, and would not be a peak.
    """
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    with torch.inference_mode():
        F.linear(a, b)  # warm-up (and kernel selection)
        sync(device)
        best, spent, reps = float("inf"), 0.0, 0
        while reps < 2 or (spent < min_time and reps < 200):
            sync(device)
            t0 = time.perf_counter()
            F.linear(a, b)
            sync(device)
            dt = time.perf_counter() - t0
            best, spent, reps = min(best, dt), spent + dt, reps + 1
    return 2.0 * n**3 / best / 1e12


def time_pair(fns: dict, x: torch.Tensor, device: torch.device, args, estimate: float | None) -> dict[str, list[float]]:
    """Warm up, then time the implementations alternately (order flipped every round).

    `estimate` is the expected seconds of one round (every implementation once) from the cells
    already timed. A cell whose round is expected to take >= --long seconds gets no warm-up (one-off
    costs are negligible against it); rounds stop at --max-iters, or once --min-iters rounds and
    --min-time seconds per side are reached, or when another round would pass --cell-budget seconds
    (at least one round is always timed).
    """
    names = list(fns)
    warmup = args.warmup if estimate is None or estimate < args.long else 0
    with torch.inference_mode():
        for _ in range(warmup):
            for name in names:
                fns[name](x)
        sync(device)
        times: dict[str, list[float]] = {name: [] for name in names}
        rounds, start = 0, time.perf_counter()
        while True:
            for name in names if rounds % 2 == 0 else reversed(names):
                sync(device)
                t0 = time.perf_counter()
                fns[name](x)
                sync(device)
                times[name].append(time.perf_counter() - t0)
            rounds += 1
            elapsed = time.perf_counter() - start
            if rounds >= args.max_iters:
                break
            if rounds >= args.min_iters and min(sum(t) for t in times.values()) >= args.min_time:
                break
            if elapsed + elapsed / rounds > args.cell_budget:
                break
    return times


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--models", default="dinov2_vits14", help="comma-separated backbone names")
    p.add_argument("--sizes", default="224,518", help="square input sizes, multiples of 14")
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default: the core count)")
    p.add_argument(
        "--warmup", type=int, default=None, help="warm-up iterations per implementation and cell (1 on CPU, 5 on CUDA)"
    )
    p.add_argument("--min-iters", type=int, default=3, help="timed iterations per implementation and cell, at least")
    p.add_argument("--max-iters", type=int, default=None, help="... and at most (30 on CPU, 1000 on CUDA)")
    p.add_argument(
        "--min-time", type=float, default=2.5, help="seconds per implementation and cell to reach (if under max-iters)"
    )
    p.add_argument(
        "--cell-budget", type=float, default=60.0, help="seconds of timed rounds per cell before stopping early"
    )
    p.add_argument(
        "--long", type=float, default=5.0, help="expected seconds per round from which a cell gets no warm-up"
    )
    p.add_argument("--peak-size", type=int, default=None, help="matmul side for the peak (default 2048 CPU, 8192 GPU)")
    p.add_argument("--tol", type=float, default=1e-3, help="max abs diff of the fp32 logits at 518 allowed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 224 only, batch 1, fp32+bf16, minimal repeats")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if args.warmup is None:
        args.warmup = 5 if cuda else 1
    if args.max_iters is None:
        args.max_iters = 1000 if cuda else 30
    if args.quick:
        args.sizes, args.batches = "224", "1"
        args.warmup, args.min_iters, args.max_iters, args.min_time, args.cell_budget = 1, 1, 1, 0.0, 10.0
        args.peak_size = args.peak_size or 1024
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = choose_device(args.device)
    except DinosegError as e:
        print(e, file=sys.stderr)
        return 2
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sizes = [int(s) for s in args.sizes.split(",")]
    precisions = [s.strip() for s in args.precisions.split(",")]
    batches = [int(s) for s in args.batches.split(",")]
    for prec in precisions:
        if prec not in PRECISIONS:
            raise SystemExit(f"unknown precision {prec}: use {', '.join(PRECISIONS)}")
    for s in sizes:
        if s % 14:
            raise SystemExit(f"size {s} is not a multiple of 14")
    if device.type == "cpu":
        threads = args.threads or core_count()
        torch.set_num_threads(threads)
    torch.manual_seed(args.seed)

    import transformers

    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    if device.type == "cuda":
        machine = f"GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}); host CPU {cpu_model()}, {core_count()} cores"
    else:
        flags = ", ".join(cpu_flags()) or "none of avx2/avx512/amx"
        machine = f"CPU {cpu_model()} ({platform.machine()}), {core_count()} cores, flags: {flags}"
    emit(f"- machine: {machine}")
    emit(
        f"- torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}"
        + (f", torch threads {torch.get_num_threads()}" if device.type == "cpu" else "")
    )
    given = " ".join(sys.argv[1:] if argv is None else argv)
    emit(f"- command: `python benchmarks/bench_backbone.py{' ' + given if given else ''}`")

    peak_n = args.peak_size or (8192 if device.type == "cuda" else 2048)
    peak_dtypes = list(dict.fromkeys(precisions + (["bf16"] if device.type == "cuda" else [])))
    peak_time = 0.2 if args.quick else 1.0

    def measure_peaks() -> dict[str, float]:
        return {prec: matmul_peak(device, PRECISIONS[prec], peak_n, peak_time) for prec in peak_dtypes}

    peaks_start = measure_peaks()  # measured again after the table; the best of both is the peak
    print("matmul peak (start): " + ", ".join(f"{p} {v:.3f} TFLOP/s" for p, v in peaks_start.items()), flush=True)

    run_start = time.perf_counter()
    classes = ClassMap(
        tuple(f"class{i}" for i in range(NUM_CLASSES)), tuple(default_color(i) for i in range(NUM_CLASSES))
    )
    rows: list[dict] = []
    checks: list[str] = []
    attn_impl = None
    for name in models:
        backbone = build_backbone(name)
        c = backbone.config
        head = LinearHead(HeadConfig("linear", default_layers("linear", c.depth), c.embed_dim, NUM_CLASSES))
        randomise(backbone, head, args.seed)
        hf = build_hf(backbone, device)
        attn_impl = hf.config._attn_implementation
        ours = {p: Segmenter(backbone, head, classes, InferenceConfig(precision=p), device) for p in precisions}
        theirs = {p: HFSegmenter(hf, head, c.patch_size, device, p) for p in precisions}

        # equality once, fp32, at 518 where neither side resizes the position embeddings
        gen = torch.Generator().manual_seed(args.seed + 1)
        x = torch.randn(1, 3, CHECK_SIZE, CHECK_SIZE, generator=gen).to(device)
        fp32_ours = Segmenter(backbone, head, classes, InferenceConfig(precision="fp32"), device)
        with torch.inference_mode():
            a, b = fp32_ours(x), HFSegmenter(hf, head, c.patch_size, device, "fp32")(x)
        diff = (a - b).abs().max().item()
        ok = diff <= args.tol
        checks.append(
            f"{name}: max abs diff of fp32 logits ours vs HF at {CHECK_SIZE}x{CHECK_SIZE} = {diff:.2e} "
            f"(logit scale {a.abs().max().item():.2f}, tol {args.tol:g}) -> {'OK' if ok else 'FAIL'}"
        )
        print(checks[-1], flush=True)
        if not ok:
            for line in checks:
                emit(f"- check: {line}")
            print("outputs differ: not timing", file=sys.stderr)
            return 1

        for size in sizes:
            gflops = (count_flops(c, size, size) + head_flops(head, size, size, c.patch_size)) / 1e9
            for prec in precisions:
                for batch in batches:
                    x = torch.randn(batch, 3, size, size, generator=gen).to(device)
                    # seconds per image per GFLOP of this model and precision so far -> this cell's round
                    done = [r for r in rows if r["model"] == name and r["precision"] == prec]
                    estimate = max((r["round_s"] / (r["batch"] * r["gflops"]) for r in done), default=None)
                    estimate = estimate * batch * gflops if estimate is not None else None
                    times = time_pair({"ours": ours[prec], "hf": theirs[prec]}, x, device, args, estimate)
                    t_ours, t_hf = statistics.median(times["ours"]), statistics.median(times["hf"])
                    ips_ours, ips_hf = batch / t_ours, batch / t_hf
                    row = {
                        "model": name,
                        "size": size,
                        "precision": prec,
                        "batch": batch,
                        "ours": ips_ours,
                        "hf": ips_hf,
                        "ratio": ips_ours / ips_hf,
                        "gflops": gflops,
                        "tflops": ips_ours * gflops / 1e3,
                        "iters": len(times["ours"]),
                        "round_s": t_ours + t_hf,
                    }
                    rows.append(row)
                    print(
                        f"  {name} {size} {prec} b{batch}: ours {ips_ours:.2f} img/s, HF {ips_hf:.2f} img/s, "
                        f"ratio {row['ratio']:.2f} ({row['iters']} iters each)",
                        flush=True,
                    )
        del ours, theirs, hf, backbone, head
        if device.type == "cuda":
            torch.cuda.empty_cache()

    peaks_end = measure_peaks()
    peaks = {p: max(peaks_start[p], peaks_end[p]) for p in peak_dtypes}
    for r in rows:
        r["frac"] = r["tflops"] / peaks[r["precision"]]
        r["frac_bf16"] = r["tflops"] / peaks["bf16"] if "bf16" in peaks else None
    tf32 = " (TF32 off)" if device.type == "cuda" and not torch.backends.cuda.matmul.allow_tf32 else ""
    emit(
        f"- measured matmul peak ({peak_n}x{peak_n} F.linear, best of repeats at the start and the end of the run): "
        + ", ".join(f"{p} {v:.3f} TFLOP/s" for p, v in peaks.items())
        + tf32
        + " (start: "
        + ", ".join(f"{p} {v:.3f}" for p, v in peaks_start.items())
        + "; end: "
        + ", ".join(f"{p} {v:.3f}" for p, v in peaks_end.items())
        + ")"
    )
    for line in checks:
        emit(f"- check: {line}")
    emit(
        f"- HF: transformers Dinov2Model, attn_implementation={attn_impl!r}, last_hidden_state -> drop CLS -> reshape -> the same LinearHead"
    )
    emit(
        "- GFLOPs/img: model.backbone.count_flops + the head's 1x1 conv, multiply-adds counted x2 "
        "(norms, softmax, GELU not counted); ours TFLOP/s = ours img/s x GFLOPs/img; "
        "fraction = ours TFLOP/s / measured matmul peak of the same dtype"
        + ("; 'of bf16 peak' divides by the bf16 peak" if device.type == "cuda" else "")
    )
    emit(
        f"- timing: ours and HF alternating within each cell, median time per iteration; {args.warmup} warm-up "
        f"(none where a round was expected to take >= {args.long:g} s), then {args.min_iters}..{args.max_iters} "
        f"timed iterations per side until >= {args.min_time:g} s per side, fewer where another round would pass "
        f"{args.cell_budget:g} s (the iters column); total run {time.perf_counter() - run_start:.0f} s"
    )
    emit()
    cols = [
        "model",
        "size",
        "precision",
        "batch",
        "ours img/s",
        "HF img/s",
        "ours/HF",
        "GFLOPs/img",
        "ours TFLOP/s",
        "fraction of measured matmul peak",
    ]
    if device.type == "cuda":
        cols.append("of bf16 peak")
    cols.append("iters")
    emit("| " + " | ".join(cols) + " |")
    emit("|" + "|".join("---" if i < 3 else "---:" for i in range(len(cols))) + "|")
    for r in rows:
        cells = [
            r["model"],
            str(r["size"]),
            r["precision"],
            str(r["batch"]),
            f"{r['ours']:.2f}",
            f"{r['hf']:.2f}",
            f"{r['ratio']:.2f}",
            f"{r['gflops']:.1f}",
            f"{r['tflops']:.3f}",
            f"{r['frac']:.1%}",
        ]
        if device.type == "cuda":
            cells.append(f"{r['frac_bf16']:.1%}")
        cells.append(str(r["iters"]))
        emit("| " + " | ".join(cells) + " |")
    emit()

    # the aims
    for name in models:
        for size in sorted(set(sizes), reverse=True):
            parts = []
            for batch in batches:
                cell = {
                    r["precision"]: r for r in rows if r["model"] == name and r["size"] == size and r["batch"] == batch
                }
                if "fp32" in cell and "bf16" in cell:
                    parts.append(f"batch {batch}: {cell['bf16']['ours'] / cell['fp32']['ours']:.2f}x")
            if parts:
                emit(
                    f"- {name} bf16/fp32 (ours) at {size}: "
                    + ", ".join(parts)
                    + (
                        f" (bf16/fp32 matmul peak ratio {peaks['bf16'] / peaks['fp32']:.2f})"
                        if {"bf16", "fp32"} <= set(peaks)
                        else ""
                    )
                )
    worst = min(rows, key=lambda r: r["ratio"]) if rows else None
    if worst:
        emit(
            f"- ours/HF: min {worst['ratio']:.2f} ({worst['model']} {worst['size']} {worst['precision']} batch {worst['batch']}), "
            f"max {max(r['ratio'] for r in rows):.2f}; cells below 1.00: "
            + (
                ", ".join(
                    f"{r['model']} {r['size']} {r['precision']} b{r['batch']} ({r['ratio']:.2f})"
                    for r in rows
                    if r["ratio"] < 1.0
                )
                or "none"
            )
        )
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
