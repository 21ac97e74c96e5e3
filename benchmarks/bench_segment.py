"""Benchmark: the `segment` job end to end, against the bare Segmenter and a plain loop (issue 3).

One run, one model (a random `dinov2_vits14` + a 21-class linear head by default; nothing is
downloaded), one inference resolution R, over synthetic photo-like JPEGs on local disk:

* (a) `Segmenter.predict` on pre-decoded uint8 arrays in batches of B: exactly what the job's
  actor is handed (decoded and shrunk toward R by the project's `decode_image` with the job's
  `DecodeConfig`, masks at the original size via `output_sizes`), without read, decode or write.
* (b) `run_segment(SegmentConfig(...))` over a folder of N images into a fresh output
  folder, in a subprocess, once per N in --images (default 500 and 2000; the larger set holds the
  smaller one). Its wall time is that of `run_segment()` (driver model load, listing, Ray start-up and
  shutdown included); run.json's images/s is also shown; the steady-state rate is
  (N2 - N1) / (T(N2) - T(N1)), which cancels the fixed costs. Memory is sampled from /proc over
  the whole process tree (the driver, raylet, GCS, Ray workers; RSS every 0.2 s, PSS every 2 s;
  psutil is not a dependency, so it is not used): the driver's peak RSS,
  the peak of the tree's summed RSS (counts pages shared by several processes, e.g. the object
  store, once per process), and the peak of the tree's summed PSS (shared pages split between the
  processes that map them: the tree's real footprint).
* (c) a plain single-process loop, one image at a time: read the bytes, `decode_image` (same
  DecodeConfig as the job), `predict([image])`, `encode_mask_png`, `write_bytes_atomic`.

(a) and (c) run with as many torch threads as the job's predictor actor ends up with; a probe
(a Ray Data actor pool configured like the job's, building the job's `Predict`) reports
OMP_NUM_THREADS and torch's thread count inside the actor before and after `Predict.__init__`.

    python benchmarks/bench_segment.py                # CPU, R=112, 500 + 2000 images (~10 min on 2 cores)
    python benchmarks/bench_segment.py --quick        # smoke run (~1.5 min)
    python benchmarks/bench_segment.py --device cuda --model-backbone dinov2_vitl14 --resolution 518 --out gpu.md

With --device cuda, GPU utilisation (nvidia-smi, every 0.2 s) is reported for (a) and (b).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NUM_CLASSES = 21
# photo-like sizes, cycled (mean ~0.37 megapixels); the mask comes back at this size
SIZES = [
    (640, 480),
    (640, 480),
    (480, 640),
    (800, 600),
    (640, 480),
    (512, 384),
    (480, 640),
    (1024, 768),
    (600, 600),
    (640, 427),
]

from machine import core_count, cpu_model  # noqa: E402  (benchmarks/ is the script's folder)


def decode_module():
    """Where decode_image and DecodeConfig live."""
    import pipeline.data.decode

    return pipeline.data.decode


# ---- inputs ----------------------------------------------------------------------------------


def photo(index: int) -> bytes:
    """A deterministic photo-like JPEG: a smooth colour field, a few flat shapes, sensor noise."""
    from PIL import Image, ImageChops, ImageDraw

    w, h = SIZES[index % len(SIZES)]
    rng = np.random.default_rng(index)
    grid = rng.integers(0, 256, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    noise = Image.fromarray(rng.integers(118, 139, (h, w), dtype=np.uint8)).convert("RGB")
    buf = io.BytesIO()
    ImageChops.add(img, noise, offset=-128).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_photo(path_index):
    path, index = path_index
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        Path(tmp).write_bytes(photo(index))
        os.replace(tmp, path)


def make_images(workdir: Path, counts: list[int]) -> dict[int, Path]:
    """images/ holds max(counts) JPEGs (kept across runs with --workdir); in_<n>/ hard-links the first n."""
    images = workdir / "images"
    images.mkdir(parents=True, exist_ok=True)
    todo = [(str(images / f"img_{i:05d}.jpg"), i) for i in range(max(counts))]
    with Pool(core_count()) as pool:
        pool.map(_write_photo, todo, chunksize=16)
    folders = {}
    for n in counts:
        folder = workdir / f"in_{n}"
        if not folder.exists() or len(list(folder.iterdir())) != n:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            for path, _ in todo[:n]:
                try:
                    os.link(path, folder / os.path.basename(path))
                except OSError:
                    shutil.copy(path, folder)
        folders[n] = folder
    return folders


def write_head(path: Path, backbone: str, resolution: int, seed: int) -> None:
    """A dinoseg head checkpoint with random weights for `backbone` (21 classes, VOC's map)."""
    import torch

    from model.backbone import backbone_config
    from model.checkpoint import HeadCheckpoint, save_head_checkpoint
    from model.classes import bundled
    from model.heads import HeadConfig, LinearHead, default_layers

    cfg = backbone_config(backbone)
    torch.manual_seed(seed)
    head = LinearHead(HeadConfig("linear", default_layers("linear", cfg.depth), cfg.embed_dim, NUM_CLASSES))
    with torch.no_grad():  # varied classes across the image, so masks are not one flat colour
        head.conv_seg.weight.normal_(0, 0.5)
    classes = bundled("voc2012")
    save_head_checkpoint(
        HeadCheckpoint(backbone, head.config, classes, head.state_dict(), resolution=resolution), str(path)
    )


# ---- sampling --------------------------------------------------------------------------------


def _proc_tree(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(parents.get(pid, []))
    return tree


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


class TreeMemory(threading.Thread):
    """Peak RSS of a process, and peak summed RSS / PSS of its process tree, from /proc.

    RSS (statm) every `interval` s; the tree's membership and CPU times every `tree_interval` s;
    PSS (smaps_rollup, ~40 ms for a Ray tree) every `pss_interval` s. The sampler runs at nice 0
    beside Ray's workers (nice 15), so it is kept to a few % of one core."""

    def __init__(self, pid: int, interval: float = 0.2, tree_interval: float = 1.0, pss_interval: float = 2.0):
        super().__init__(daemon=True)
        self.pid, self.interval, self.tree_interval, self.pss_interval = pid, interval, tree_interval, pss_interval
        self.driver = self.tree_rss = self.tree_pss = 0  # KiB
        self.processes = 0
        self.cpu_ticks: dict[int, int] = {}
        self._page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
        self._done = threading.Event()

    def _rss(self, pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * self._page_kib
        except (OSError, ValueError, IndexError):
            return 0

    def run_segment(self):
        pids: list[int] = []
        last_tree = last_pss = -1e9
        while not self._done.is_set():
            now = time.monotonic()
            if now - last_tree >= self.tree_interval:
                last_tree, pids = now, _proc_tree(self.pid)
                for pid in pids:
                    try:
                        stat = Path(f"/proc/{pid}/stat").read_text()
                        fields = stat[stat.rindex(")") + 2 :].split()
                        self.cpu_ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
                    except (OSError, ValueError, IndexError):
                        pass
                self.processes = max(self.processes, len(pids))
            sizes = [self._rss(pid) for pid in pids]
            if pids:
                self.driver = max(self.driver, sizes[0])  # _proc_tree lists the root first
            self.tree_rss = max(self.tree_rss, sum(sizes))
            if now - last_pss >= self.pss_interval:
                last_pss = now
                self.tree_pss = max(self.tree_pss, sum(_kib(f"/proc/{pid}/smaps_rollup", "Pss:") for pid in pids))
            self._done.wait(self.interval)

    def stop(self) -> dict:
        self._done.set()
        self.join()
        cpu = sum(self.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")
        return {
            "driver_mib": self.driver / 1024,
            "tree_rss_mib": self.tree_rss / 1024,
            "tree_pss_mib": self.tree_pss / 1024,
            "processes": self.processes,
            "cpu_s": cpu,
        }


class GpuUtilisation:
    """nvidia-smi's utilisation.gpu every 0.2 s while running; mean over all samples and over
    the busy span (first to last sample above 0)."""

    def __init__(self, index: int):
        self.index, self.samples, self.proc = index, [], None

    def __enter__(self):
        if shutil.which("nvidia-smi"):
            self.proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "-i",
                    str(self.index),
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                util, mem = (float(v) for v in line.split(","))
                self.samples.append((util, mem))
            except ValueError:
                pass

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()

    def summary(self) -> str:
        if not self.samples:
            return "n/a (no nvidia-smi samples)"
        util = [u for u, _ in self.samples]
        busy = [i for i, u in enumerate(util) if u > 0] or [0]
        span = util[busy[0] : busy[-1] + 1]
        return (
            f"mean {np.mean(util):.0f}% over the run, {np.mean(span):.0f}% over the busy span, "
            f"peak memory {max(m for _, m in self.samples):.0f} MiB"
        )


# ---- (a) and (c), in this process ------------------------------------------------------------


def job_config(args, input: str, output: str, head: Path):
    from pipeline.segment import SegmentConfig

    return SegmentConfig(
        input,
        output,
        model=None,
        head=str(head),
        backbone_weights="random",
        resolution=args.resolution,
        precision=args.precision,
        batch_size=args.batch_size,
        device=args.device,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        **({} if args.decode_cpus is None else {"decode_cpus": args.decode_cpus}),
    )


def build_inprocess(args, head: Path):
    from model.hub import build_segmenter
    from pipeline.segment.config import inference_config, shrink_for

    inference = inference_config(job_config(args, "", "", head))
    segmenter = build_segmenter(head=str(head), backbone_weights="random", config=inference, device=args.device)
    dec = decode_module()
    return segmenter, dec.DecodeConfig(max_megapixels=100.0, shrink_to=shrink_for(inference))


def bench_bare(segmenter, decode_config, files: list[Path], batch: int, gpu: int | None) -> dict:
    dec = decode_module()
    decoded = [dec.decode_image(f.read_bytes(), decode_config) for f in files]
    images = [d[0] for d in decoded]
    sizes = [(d[2], d[1]) for d in decoded]
    segmenter.predict(images[:batch], output_sizes=sizes[:batch])  # warm-up
    util = GpuUtilisation(gpu) if gpu is not None else None
    with util or _null():
        t0 = time.perf_counter()
        for i in range(0, len(images), batch):
            segmenter.predict(images[i : i + batch], output_sizes=sizes[i : i + batch])
        wall = time.perf_counter() - t0
    return {"n": len(images), "wall": wall, "gpu": util.summary() if util else ""}


def bench_plain(segmenter, decode_config, files: list[Path], output: Path) -> dict:
    from pipeline.io.files import write_bytes_atomic
    from pipeline.io.masks import encode_mask_png, mask_url

    dec = decode_module()
    shutil.rmtree(output, ignore_errors=True)
    segmenter.predict([dec.decode_image(files[0].read_bytes(), decode_config)[0]])  # warm-up
    t0 = time.perf_counter()
    for f in files:
        image, width, height = dec.decode_image(f.read_bytes(), decode_config)
        pred = segmenter.predict([image], output_sizes=[(height, width)])[0]
        write_bytes_atomic(mask_url(str(output), f.stem), encode_mask_png(pred.mask, segmenter.classes))
    return {"n": len(files), "wall": time.perf_counter() - t0}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---- (b) and the probe, in subprocesses ------------------------------------------------------


def child(mode: str, spec_file: str) -> int:
    """The subprocess side: `job` runs the segment job; `probe` reports the actor's threads."""
    import logging

    from pipeline.segment import SegmentConfig, run_segment

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(spec_file).read_text())
    config = SegmentConfig(**spec["config"])
    if mode == "job":
        t0 = time.perf_counter()
        counts = run_segment(config)
        result = {"wall": time.perf_counter() - t0, "counts": counts}
    else:
        result = probe_threads(config)
    Path(spec["result"]).write_text(json.dumps(result, default=str))
    return 0


class _ThreadProbe:
    """A Ray Data actor like the job's predictor: reports threads before and after Predict()."""

    def __init__(self, config):
        import torch

        from pipeline.segment.predict import Predict

        self.before = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch": torch.get_num_threads()}
        Predict(config)
        self.after = torch.get_num_threads()

    def __call__(self, batch):
        return {
            "info": np.array(
                [
                    json.dumps(
                        {
                            **self.before,
                            "torch_after_predict_init": self.after,
                            "affinity": core_count(),
                            "nice": os.nice(0),
                        }
                    )
                ]
            )
        }


def probe_threads(config) -> dict:
    import ray.data

    from pipeline import runtime
    from pipeline.segment.config import inference_config
    from pipeline.segment.predict import PredictConfig

    started = runtime.start_ray(config.address)
    try:
        res = runtime.Resources(
            config.actors, config.gpus_per_actor, config.cpus_per_actor, config.decode_cpus, config.batch_size
        ).resolve(runtime.cluster_resources())
        pc = PredictConfig(None, None, config.head, config.backbone_weights, inference_config(config), config.device)
        # from_items: no read task, whose CPU request could starve beside the actor
        ds = ray.data.from_items([{"row": 0}]).map_batches(
            _ThreadProbe,
            fn_constructor_kwargs={"config": pc},
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=1,
            batch_format="numpy",
            num_cpus=res.cpus_per_actor,
            num_gpus=res.gpus_per_actor or None,
        )
        info = json.loads(ds.take(1)[0]["info"])
        return {"resources": str(res), "cluster": runtime.cluster_resources(), **info}
    finally:
        if started:
            runtime.stop_ray()


def _kill_tree(pid: int) -> None:
    """SIGKILL a process we started and everything below it (the job's Ray processes), by pid."""
    import signal

    for p in reversed(_proc_tree(pid)):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def spawn(mode: str, config, workdir: Path, tag: str, timeout: float, gpu: int | None = None) -> dict:
    """Run `child(mode)` in a fresh interpreter; sample its process tree while it runs. A child
    still running after `timeout` s (a starved Ray Data graph hangs without a word) is killed."""
    import dataclasses

    spec, result, log = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json", workdir / f"{tag}.log"
    result.unlink(missing_ok=True)
    spec.write_text(json.dumps({"config": dataclasses.asdict(config), "result": str(result)}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(ROOT)}
    util = GpuUtilisation(gpu) if gpu is not None else None
    t0 = time.perf_counter()
    with open(log, "w") as out, util or _null():
        proc = subprocess.Popen(
            [sys.executable, __file__, f"--_{mode}", str(spec)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        memory = TreeMemory(proc.pid)
        memory.start()
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)
            proc.wait()
            memory.stop()
            sys.exit(
                f"the {tag} subprocess ran past {timeout:.0f} s and was killed (a hang? the job's "
                f"resources are in the log); the end of {log}:\n" + log.read_text(errors="replace")[-4000:]
            )
    process_wall = time.perf_counter() - t0
    mem = memory.stop()
    text = log.read_text(errors="replace")
    if rc != 0 or not result.exists():
        sys.exit(f"the {tag} subprocess failed (exit {rc}); the end of {log}:\n" + text[-4000:])
    out = json.loads(result.read_text()) | {"memory": mem, "process_wall": process_wall, "log": str(log)}
    if util:
        out["gpu"] = util.summary()
    plans = [line.split(": ", 1)[-1].strip() for line in text.splitlines() if "Execution plan of Dataset" in line]
    out["plan"] = plans[0] if plans else ""
    return out


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (for (a), (b) and (c))")
    p.add_argument("--model-backbone", default="dinov2_vits14", help="backbone of the random head checkpoint")
    p.add_argument("--resolution", type=int, default=112, help="inference short side R")
    p.add_argument("--batch-size", type=int, default=8, help="B: the job's --batch-size and (a)'s batches")
    p.add_argument("--precision", default="auto", help="auto (fp32 on CPU, bf16 on GPU), fp32, bf16, fp16")
    p.add_argument(
        "--images", default="500,2000", help="comma-separated image counts for (b) (memory and steady state)"
    )
    p.add_argument("--bare-images", type=int, default=200, help="images for (a)")
    p.add_argument("--plain-images", type=int, default=200, help="images for (c)")
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads for (a)/(c) (default: what the job's actor gets)"
    )
    p.add_argument("--actors", type=int, default=None, help="the job's --actors (default: the job's)")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="the job's --cpus-per-actor (default: the job's)")
    p.add_argument("--decode-cpus", type=float, default=None, help="the job's --decode-cpus (default: the job's)")
    p.add_argument("--workdir", default=None, help="keep images (and outputs) here; reused by later runs")
    p.add_argument(
        "--timeout", type=float, default=1800, help="seconds before a job subprocess counts as hung and is killed"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 20 and 40 images for (b), 16 for (a) and (c)")
    p.add_argument("--out", default=None, help="also write the markdown report to this file")
    p.add_argument("--_job", help=argparse.SUPPRESS)
    p.add_argument("--_probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.bare_images, args.plain_images = "20,40", 16, 16
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._job or args._probe:
        return child("job" if args._job else "probe", args._job or args._probe)
    import ray
    import torch

    from model.device import choose_device
    from model.errors import DinosegError

    try:
        device = choose_device(args.device)
    except DinosegError as e:
        print(e, file=sys.stderr)
        return 2
    gpu = (device.index or 0) if device.type == "cuda" else None
    counts = sorted({int(n) for n in args.images.split(",")})
    run_start = time.perf_counter()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_segment_"))
    workdir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    try:
        t0 = time.perf_counter()
        folders = make_images(workdir, sorted(set(counts) | {args.bare_images, args.plain_images}))
        files = sorted(folders[max(counts + [args.bare_images, args.plain_images])].iterdir())
        gen_s = time.perf_counter() - t0
        head = workdir / f"head_{args.model_backbone}_{args.resolution}.pt"
        write_head(head, args.model_backbone, args.resolution, args.seed)
        print(
            f"[{time.perf_counter() - run_start:.0f} s] inputs ready ({gen_s:.0f} s); probing the actor's threads",
            flush=True,
        )

        probe = spawn(
            "probe",
            job_config(args, str(folders[counts[0]]), str(workdir / "probe"), head),
            workdir,
            "probe",
            min(args.timeout, 300),
        )
        threads = args.threads or int(probe["torch_after_predict_init"])
        if device.type == "cpu":
            torch.set_num_threads(threads)
        segmenter, decode_config = build_inprocess(args, head)
        print(f"[{time.perf_counter() - run_start:.0f} s] (a) bare Segmenter, {args.bare_images} images", flush=True)
        bare = bench_bare(segmenter, decode_config, files[: args.bare_images], args.batch_size, gpu)
        print(f"[{time.perf_counter() - run_start:.0f} s] (c) plain loop, {args.plain_images} images", flush=True)
        plain = bench_plain(segmenter, decode_config, files[: args.plain_images], workdir / "out_plain")
        precision = segmenter.precision
        del segmenter
        if device.type == "cuda":  # hand the memory back before the job's actor wants the GPU
            torch.cuda.empty_cache()
        jobs = {}
        for n in counts:
            print(f"[{time.perf_counter() - run_start:.0f} s] (b) segment job, {n} images", flush=True)
            out = workdir / f"out_{n}"
            shutil.rmtree(out, ignore_errors=True)
            jobs[n] = spawn(
                "job", job_config(args, str(folders[n]), str(out), head), workdir, f"job_{n}", args.timeout, gpu
            )
            jobs[n]["run_json"] = json.loads((out / "run.json").read_text())
            if jobs[n]["counts"]["predicted"] != n:
                sys.exit(f"the job predicted {jobs[n]['counts']} of {n} images: see {jobs[n]['log']}")
        total = time.perf_counter() - run_start

        # ---- report
        if device.type == "cuda":
            machine = f"GPU {torch.cuda.get_device_name(device)}; host CPU {cpu_model()}, {core_count()} cores"
        else:
            machine = f"CPU {cpu_model()} ({platform.machine()}), {core_count()} cores"
        a_ips, c_ips = bare["n"] / bare["wall"], plain["n"] / plain["wall"]
        emit(f"- machine: {machine}; load average at the end {os.getloadavg()[0]:.2f}")
        emit(
            f"- torch {torch.__version__}, ray {ray.__version__}, python {platform.python_version()}; "
            f"decode from {decode_module().__name__}"
        )
        emit(
            f"- model: {args.model_backbone} (random weights) + linear head, {NUM_CLASSES} classes; R={args.resolution}, "
            f"batch size {args.batch_size}, {precision} on {device}"
        )
        emit(
            f"- images: synthetic JPEGs (q90, sizes {', '.join(f'{w}x{h}' for w, h in sorted(set(SIZES)))}, "
            f"mean {np.mean([w * h for w, h in SIZES]) / 1e6:.2f} MP), on local disk (page cache warm)"
        )
        emit(f"- job resources (Resources.resolve on {probe['cluster']}): {probe['resources']}")
        emit(
            f"- threads in the job's actor: OMP_NUM_THREADS={probe['OMP_NUM_THREADS']}, torch {probe['torch']} "
            f"at start, {probe['torch_after_predict_init']} after Predict.__init__ (CPU affinity {probe['affinity']}, "
            f"nice {probe.get('nice')}); (a) and (c) ran with {torch.get_num_threads()} torch threads (nice {os.nice(0)})"
        )
        plan = jobs[counts[-1]]["plan"]
        if plan:
            fused = "ActorPoolMapOperator[MapBatches(ReadBytes)" in plan
            emit(
                f"- Ray Data plan: {plan}"
                + (
                    " (read and decode are fused into the predictor actor: same "
                    "resources, so they run in turn with inference there)"
                    if fused
                    else ""
                )
            )
        emit(f"- total run {total:.0f} s (inputs {gen_s:.0f} s)")
        emit()
        emit(
            "| run | images | wall s | images/s | (b)/(a) | (b)/(c) | driver peak RSS MiB | tree peak RSS MiB | tree peak PSS MiB | CPU s | GPU |"
        )
        emit("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        emit(
            f"| (a) bare Segmenter.predict, batches of {args.batch_size} | {bare['n']} | {bare['wall']:.1f} | {a_ips:.2f} | | | | | | | {bare['gpu']} |"
        )
        emit(
            f"| (c) plain loop, one image at a time | {plain['n']} | {plain['wall']:.1f} | {c_ips:.2f} | | | | | | | |"
        )
        for n in counts:
            j, m = jobs[n], jobs[n]["memory"]
            ips = n / j["wall"]
            emit(
                f"| (b) segment job (run.json: {j['run_json']['images_per_second']:.2f} img/s) | {n} | {j['wall']:.1f} | "
                f"{ips:.2f} | {ips / a_ips:.2f} | {ips / c_ips:.2f} | {m['driver_mib']:.0f} | {m['tree_rss_mib']:.0f} | "
                f"{m['tree_pss_mib']:.0f} | {m['cpu_s']:.0f} | {j.get('gpu', '')} |"
            )
        steady = None
        if len(counts) > 1:
            lo, hi = counts[0], counts[-1]
            dt = jobs[hi]["wall"] - jobs[lo]["wall"]
            steady = (hi - lo) / dt if dt > 0 else None  # None: the difference drowned in noise
            cells = f"{steady:.2f} | {steady / a_ips:.2f} | {steady / c_ips:.2f}" if steady else "n/a | | "
            emit(
                f"| (b) steady state: ({hi} - {lo}) / (T({hi}) - T({lo})) | {hi - lo} | {dt:.1f} | {cells} | | | | | |"
            )
        emit()
        big = counts[-1]
        end_to_end = big / jobs[big]["wall"]
        shaky = len(counts) > 1 and counts[-1] - counts[0] < 500  # a few seconds apart: noise decides
        for name, value in (
            ("end to end", end_to_end),
            ("steady state" + (" (too few images apart to mean much)" if shaky else ""), steady),
        ):
            if value is not None:
                emit(
                    f"- aim (b) >= 0.8 x (a) and >= 1.5 x (c), {name}: (b)/(a) = {value / a_ips:.2f} "
                    f"({'met' if value >= 0.8 * a_ips else 'not met'}), (b)/(c) = {value / c_ips:.2f} "
                    f"({'met' if value >= 1.5 * c_ips else 'not met'})"
                )
        if len(counts) > 1:
            lo = counts[0]
            for key, label in (
                ("tree_pss_mib", "tree PSS"),
                ("tree_rss_mib", "tree RSS"),
                ("driver_mib", "driver RSS"),
            ):
                ratio = jobs[big]["memory"][key] / jobs[lo]["memory"][key]
                emit(
                    f"- aim peak memory({big}) <= 1.15 x peak memory({lo}), {label}: {ratio:.3f} "
                    f"({'met' if ratio <= 1.15 else 'not met'})"
                )
        emit(
            f"- fixed cost of the job (T({counts[0]}) - {counts[0]} / steady rate): "
            + (f"{fixed:.1f} s" if steady and (fixed := jobs[counts[0]]["wall"] - counts[0] / steady) > 0 else "n/a")
            + "; subprocess wall incl. imports: "
            + ", ".join(f"{jobs[n]['process_wall']:.1f} s ({n})" for n in counts)
            + "; processes in the job's tree: "
            + ", ".join(f"{jobs[n]['memory']['processes']} ({n})" for n in counts)
        )
        emit("- CPU s: user + system seconds of the job's process tree (2 cores x wall s is the most there is)")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
