"""Shared pieces of the benchmarks: image folders cut from scikit-image's photographs, a tiny checkpoint,
subprocess runs measured for wall time and peak resident memory, and the side-by-side report.

Benchmarks compare two things measured in the same invocation and report the ratio, never an absolute
figure alone: two runs on one noisy machine agree far better than two machines do.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Generated data, checkpoints and run outputs; gitignored, and the generated folders are reused by later runs.
BENCH_OUT = REPO / "bench_out"

# Colour photographs that ship inside scikit-image (no download): one class each.
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)
# Bump when `_random_view` changes, so that folders written by the old code are not reused.
_GENERATOR_VERSION = 1
# The stand-in checkpoint's "pretraining" classes: deliberately not the photos, so that both pipelines
# replace the classifier, as they would with a real Hub checkpoint.
STAND_IN_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# --------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------
def load_photo(name: str):
    """A scikit-image photograph as an RGB PIL image."""
    import skimage.data
    from PIL import Image

    pixels = getattr(skimage.data, name)()
    if isinstance(pixels, tuple):  # stereo_motorcycle returns (left, right, disparity)
        pixels = pixels[0]
    return Image.fromarray(pixels).convert("RGB")


def _random_view(photo, rng, size: tuple[int, int], area: tuple[float, float], noise: float):
    """A random crop of `photo` (area fraction in `area`, aspect of `size`), resized to `size` (w, h),
    flipped, colour-jittered and with a little sensor-like noise: a new "photograph" of the same subject."""
    import numpy as np
    from PIL import Image, ImageEnhance

    width, height = photo.size
    aspect = size[0] / size[1] * rng.uniform(0.9, 1.1)
    crop_area = rng.uniform(*area) * width * height
    crop_w = int(min(width, np.sqrt(crop_area * aspect)))
    crop_h = int(min(height, crop_w / aspect))
    left = int(rng.integers(0, width - crop_w + 1))
    top = int(rng.integers(0, height - crop_h + 1))
    view = photo.crop((left, top, left + crop_w, top + crop_h)).resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.7, 1.3))
    view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.7, 1.3))
    view = ImageEnhance.Color(view).enhance(rng.uniform(0.7, 1.3))
    if noise:
        grain = rng.normal(0, noise, (size[1], size[0], 3))
        view = Image.fromarray((np.asarray(view, dtype=np.float32) + grain).clip(0, 255).astype(np.uint8))
    return view


def folder_bytes(root: str | Path) -> tuple[int, int]:
    """(number of .jpg files, total bytes) under root."""
    files = list(Path(root).rglob("*.jpg"))
    return len(files), sum(f.stat().st_size for f in files)


def warm_page_cache(root: str | Path) -> None:
    """Read every file once, so that neither of two compared runs pays for the first read from disk."""
    for path in Path(root).rglob("*.jpg"):
        path.read_bytes()


# --------------------------------------------------------------------------------------------------------
# Checkpoint
# --------------------------------------------------------------------------------------------------------
def build_checkpoint(folder: str | Path, arch: str, image_size: int, seed: int = 0) -> Path:
    """A tiny random-init checkpoint saved like a Hub download; rebuilt only when missing."""
    from transformers.utils import logging

    from hf_finetune.testing.tiny import build_tiny_checkpoint

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        logging.disable_progress_bar()
        build_tiny_checkpoint(arch, folder, labels=list(STAND_IN_LABELS), image_size=image_size, seed=seed)
    return folder


# --------------------------------------------------------------------------------------------------------
# Measured subprocess runs
# --------------------------------------------------------------------------------------------------------
@dataclass
class RunStats:
    returncode: int
    wall_s: float
    peak_rss_bytes: int  # largest single process of the tree (the run or one of its workers), from wait4
    peak_tree_bytes: int | None  # highest main RSS + workers' USS, sampled; None if not sampled
    cpu_s: float  # user + system time of the run and of the workers it waited for
    log: Path


def offline_env(datasets_cache: str | Path | None = None) -> dict[str, str]:
    """The environment of a benchmark subprocess: no network, optionally a fresh datasets cache."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if datasets_cache is not None:
        # A fresh cache per run: every run pays for its own data preparation, as a first run would.
        env["HF_DATASETS_CACHE"] = str(datasets_cache)
    return env


def _tree_footprint(psutil, parent) -> int:
    """RSS of the run's main process plus the unique memory (USS) of each of its descendants.

    Forked workers share most of their pages with the main process, so a sum of RSS counts those pages once
    per worker; PSS would split the shared libraries with unrelated processes that happen to map them too
    (other Python jobs on the machine). A worker's USS is exactly what it adds to the run.
    """
    try:
        children = parent.children(recursive=True)
        total = parent.memory_info().rss
    except psutil.Error:
        return 0
    for child in children:
        with contextlib.suppress(psutil.Error):  # a worker may exit between listing and reading it
            total += child.memory_full_info().uss
    return total


def run_measured(
    cmd: list[str], log: str | Path, env: dict[str, str] | None = None, tree_every_s: float | None = None
) -> RunStats:
    """Run `cmd` to completion with output to `log`; return its wall and CPU time and peak memory.

    The peak of the largest process comes from the kernel (`wait4` reports the maximum RSS of the child and
    of every descendant it waited for), so it misses nothing between samples. Dataloader workers and
    `datasets.map(num_proc=...)` processes live beside the main one, so with `tree_every_s` the memory of the
    whole tree is sampled too (reading it costs CPU time, so benchmarks of speed leave it off).
    """
    psutil = None
    if tree_every_s is not None:
        with contextlib.suppress(ImportError):  # only the sampled figure is lost
            import psutil
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    peak_tree = 0
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        parent = psutil.Process(proc.pid) if psutil else None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if parent is not None:
                peak_tree = max(peak_tree, _tree_footprint(psutil, parent))
            time.sleep(tree_every_s or 0.05)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4; tell Popen so it does not wait
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    cpu = usage.ru_utime + usage.ru_stime
    return RunStats(proc.returncode, wall, peak, peak_tree if parent is not None else None, cpu, log)


def run_timm_train_py(
    train_py: Path,
    data_dir: Path,
    checkpoint: Path,
    num_classes: int,
    run_dir: Path,
    what: str,
    flags: list[str],
) -> tuple[RunStats, dict[str, str]]:
    """timm's own train.py (from a checkout of timm's repository) fine-tuning tf_efficientnet_lite0 from
    `checkpoint`'s model.safetensors on `data_dir`/train, evaluated on `data_dir`/test after every epoch, on the
    CPU, with `flags` (epochs, size, seed, workers, ...); returns its run stats and the last epoch's row of its
    summary.csv (`eval_top1` in percent). Stops the benchmark with the log's end when it fails. `run_dir` gets
    its log and outputs (the caller clears it: small_data.py exports its data folder into it first)."""
    import csv

    command = [
        sys.executable, str(train_py), str(data_dir), "--train-split", "train", "--val-split", "test",
        "--model", "tf_efficientnet_lite0", "--pretrained", "--pretrained-path", str(checkpoint / "model.safetensors"),
        "--num-classes", str(num_classes), "--device", "cpu", "--output", str(run_dir), "--experiment", "run", *flags,
    ]  # fmt: skip
    stats = run_measured(command, log=run_dir / "log.txt", env=offline_env())
    check_ok(stats, what)
    with (run_dir / "run" / "summary.csv").open() as handle:
        return stats, list(csv.DictReader(handle))[-1]


def check_ok(stats: RunStats, what: str) -> None:
    """Stop the benchmark with the end of the run's log when the run failed."""
    if stats.returncode != 0:
        tail = "\n".join(stats.log.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"{what} failed (exit status {stats.returncode}); end of {stats.log}:\n{tail}")


def read_results(output_dir: str | Path) -> dict:
    """The metrics a Trainer run wrote with `save_metrics` (train, eval and test together)."""
    return json.loads((Path(output_dir) / "all_results.json").read_text())


def run_train_rows(
    rows: dict[str, list[str]], data_flags: list[str], runs: Path, feature_cache: Path | None = None
) -> dict[str, dict]:
    """Each row a fresh `hf_finetune.commands.cli train` subprocess (CPU, no workers) with the shared
    `data_flags` and its own flags, measured; returns {row: its all_results.json + wall_s + cpu_s}. A row's
    own folder is `runs / row` (its log, output and fresh datasets cache; flags may name paths inside it).
    Every row computes its own probe features (probe, lp_ft, auto), as a first run does, in a fresh feature
    cache (`$HF_FINETUNE_FEATURES_CACHE`, which every strategy reads), unless rows share `feature_cache`."""
    results = {}
    for name, flags in rows.items():
        run_dir = runs / name
        print(f"  running {name} (log: {run_dir / 'log.txt'}) ...", flush=True)
        output_dir = run_dir / "output"
        command = [
            sys.executable, "-m", "hf_finetune.commands.cli", "train", *data_flags, "--use_cpu", "true",
            "--dataloader_num_workers", "0", "--disable_tqdm", "true", *flags, "--output_dir", str(output_dir),
        ]  # fmt: skip
        env = offline_env(run_dir / "datasets-cache")
        env["HF_FINETUNE_FEATURES_CACHE"] = str(feature_cache or run_dir / "features")
        stats = run_measured(command, log=run_dir / "log.txt", env=env)
        check_ok(stats, name)
        results[name] = {**read_results(output_dir), "wall_s": stats.wall_s, "cpu_s": stats.cpu_s}
    return results


def keep_or_remove(runs: Path, keep: bool) -> None:
    """The end of a benchmark: its run outputs and logs removed, or kept (`--keep`) and their folder named."""
    if keep:
        print(f"  outputs and logs kept in {runs}")
    else:
        shutil.rmtree(runs)


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------
def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f} MiB"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(line.format(*header))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))


def load() -> str:
    """The 1-minute load average against the core count: other work on the machine skews both sides."""
    busy = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    note = "  (busy machine: figures are noisy)" if busy > 0.5 * cores else ""
    return f"load average {busy:.1f} on {cores} cores{note}"


def machine() -> str:
    import platform

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {device}"
    )


# --------------------------------------------------------------------------------------------------------
# Data written by several processes
# --------------------------------------------------------------------------------------------------------
def _write_views(job: tuple) -> int:
    """One (class, split) of `make_photo_folder`."""
    import numpy as np

    root, name, class_index, split, split_index, count, size, area, noise, quality, seed = job
    photo = load_photo(name)
    rng = np.random.default_rng([seed, class_index, split_index])
    folder = Path(root) / split / name
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        _random_view(photo, rng, size, area, noise).save(folder / f"{i:05d}.jpg", quality=quality)
    return count


def make_photo_folder(
    root: str | Path,
    per_class: dict[str, int],
    classes: tuple[str, ...] = PHOTOS,
    size: tuple[int, int] = (640, 480),
    area: tuple[float, float] = (0.15, 0.6),
    noise: float = 3.0,
    quality: int = 90,
    seed: int = 0,
    processes: int | None = 1,
) -> Path:
    """Write root/<split>/<photo>/<n>.jpg: `per_class[split]` random views of each photo per split.

    The folder is reused when a previous call with the same settings completed (a marker file records them).
    `processes=None` uses one process per core: large photographs (1600x1200) take a fifth of a second each to
    draw and compress, so the first run of a benchmark waits correspondingly less. The files do not depend
    on the process count.
    """
    from multiprocessing import get_context

    root = Path(root)
    settings = {
        "generator": _GENERATOR_VERSION,
        "per_class": per_class,
        "classes": list(classes),
        "size": list(size),
        "area": list(area),
        "noise": noise,
        "quality": quality,
        "seed": seed,
    }
    marker = root / ".complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    jobs = [
        (str(root), name, class_index, split, split_index, count, size, area, noise, quality, seed)
        for class_index, name in enumerate(classes)
        for split_index, (split, count) in enumerate(per_class.items())
    ]
    start = time.perf_counter()
    processes = processes or os.cpu_count() or 1
    if processes == 1:
        total = sum(map(_write_views, jobs))
    else:
        # fork is enough (no threads yet) and avoids re-importing this module in every worker.
        with get_context("fork").Pool(processes) as pool:
            total = sum(pool.imap_unordered(_write_views, jobs))
    marker.write_text(json.dumps(settings))
    print(f"  wrote {total} JPEGs of {size[0]}x{size[1]} to {root} in {time.perf_counter() - start:.0f} s")
    return root


# --------------------------------------------------------------------------------------------------------
# ViT checkpoints of a given size
# --------------------------------------------------------------------------------------------------------
def build_vit_checkpoint(
    folder: str | Path, image_size: int, seed: int = 0, labels: tuple[str, ...] = STAND_IN_LABELS, **config
) -> Path:
    """A randomly initialised ViTForImageClassification of `ViTConfig(image_size=..., **config)`, saved with a
    ViTImageProcessor at `image_size` (mean = std = 0.5, as google/vit-* ship) like a Hub download.

    `build_vit_checkpoint(folder, 224)` is ViT-B/16. Rebuilt only when the folder holds a different config.
    """
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor
    from transformers.utils import logging

    folder = Path(folder)
    wanted = ViTConfig(
        image_size=image_size,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        **config,
    )
    saved = folder / "config.json"
    if saved.is_file() and (folder / "preprocessor_config.json").is_file():
        have = json.loads(saved.read_text())
        if all(have.get(key) == value for key, value in {"image_size": image_size, **config}.items()):
            return folder
    import torch

    logging.disable_progress_bar()
    torch.manual_seed(seed)
    ViTForImageClassification(wanted).save_pretrained(folder)
    ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------------------
# Ours against the docs-style peer, in alternating subprocess runs
# --------------------------------------------------------------------------------------------------------
# The peer is `peer_main` of throughput_vs_peer.py: the transformers docs' image-classification tutorial.
PEER_SCRIPT = Path(__file__).resolve().parent / "throughput_vs_peer.py"


def ours_arguments(checkpoint, data_dir, output_dir, flags: list[str]) -> list[str]:
    """The `hf_finetune.commands.cli train` arguments for data_dir/{train,validation,test}: its defaults plus `flags`."""
    data_dir = Path(data_dir)
    return [
        "--model_name_or_path", str(checkpoint),
        "--train_dir", str(data_dir / "train"),
        "--validation_dir", str(data_dir / "validation"),
        "--test_dir", str(data_dir / "test"),
        "--output_dir", str(output_dir),
        *flags,
    ]  # fmt: skip


def ours_command(checkpoint, data_dir, output_dir, flags: list[str]) -> list[str]:
    """`python -m hf_finetune.commands.cli train` on data_dir/{train,validation,test} with its defaults plus `flags`."""
    return [
        sys.executable,
        "-m",
        "hf_finetune.commands.cli",
        "train",
        *ours_arguments(checkpoint, data_dir, output_dir, flags),
    ]


def peer_command(checkpoint, data_dir, output_dir, flags: list[str]) -> list[str]:
    """The docs-style peer of throughput_vs_peer.py; `flags` must give every setting it requires."""
    return [
        sys.executable, str(PEER_SCRIPT), "peer",
        "--data_dir", str(data_dir),
        "--model_name_or_path", str(checkpoint),
        "--output_dir", str(output_dir),
        *flags,
    ]  # fmt: skip


def run_alternating(
    commands: dict,
    runs_dir: str | Path,
    repeats: int,
    keep: bool = False,
    between=None,
    extra=None,
    pass_repeat: bool = False,
) -> dict[str, list[dict]]:
    """Run each side `repeats` times, the order alternating (a, b, b, a, ...) so that a drift in the machine's
    speed hits both alike. `commands[side](output_dir)` gives the command line (with `pass_repeat`,
    `commands[side](output_dir, repeat)`, e.g. to give each repeat its own seed). Returns, per side, one dict
    per run: the run's all_results.json metrics plus `wall_s`, `cpu_s` and `peak_rss`. `between()` (if given)
    is called before every run, e.g. to measure the machine while nothing else of ours runs; `extra(output_dir)`
    (if given) returns more figures of a finished run, read before its outputs are removed.

    Each run gets a fresh datasets cache, so each pays for its own data preparation as a first run would.
    Logs and outputs stay in runs_dir when a run fails or with `keep`; otherwise they are removed.
    """
    runs_dir = Path(runs_dir)
    shutil.rmtree(runs_dir, ignore_errors=True)
    sides = list(commands)
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    order = 0
    for repeat in range(repeats):
        for side in sides if repeat % 2 == 0 else sides[::-1]:
            if between is not None:
                between()
            run_dir = runs_dir / f"{side}-{repeat}"
            print(f"  running {side} (log: {run_dir / 'log.txt'}) ...", flush=True)
            load_before = os.getloadavg()[0]
            output_dir = run_dir / "output"
            stats = run_measured(
                commands[side](output_dir, repeat) if pass_repeat else commands[side](output_dir),
                log=run_dir / "log.txt",
                env=offline_env(datasets_cache=run_dir / "datasets-cache"),
            )
            check_ok(stats, side)
            runs[side].append(
                {
                    **read_results(run_dir / "output"),
                    "wall_s": stats.wall_s,
                    "cpu_s": stats.cpu_s,
                    "peak_rss": stats.peak_rss_bytes,
                    # Where the run came in the sequence, and the 1-minute load average around it.
                    "order": order,
                    "repeat": repeat,
                    "load_before": load_before,
                    "load_after": os.getloadavg()[0],
                    **(extra(run_dir / "output") if extra is not None else {}),
                }
            )
            order += 1
    keep_or_remove(runs_dir, keep)
    return runs


def eval_seconds_in_training(output_dir: str | Path) -> float:
    """Seconds the per-epoch evaluations took inside `train_runtime`, from the run's trainer_state.json (the
    output directory's, written after training, else the last checkpoint's: the docs' script saves no state)."""
    output_dir = Path(output_dir)
    state = output_dir / "trainer_state.json"
    if not state.is_file():
        checkpoints = sorted(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        state = checkpoints[-1] / "trainer_state.json"
    history = json.loads(state.read_text())["log_history"]
    return sum(entry["eval_runtime"] for entry in history if "eval_runtime" in entry)


def median_of(runs: list[dict], key: str) -> float:
    import statistics

    return statistics.median(run[key] for run in runs)


def best_of(runs: list[dict], key: str) -> dict:
    """The run with the lowest `key` (e.g. train_runtime). Other jobs on a machine only ever slow a run down,
    so the fastest of several is the least disturbed estimate of what the code itself costs."""
    return min(runs, key=lambda run: run[key])


def print_runs(runs: dict[str, list[dict]], columns: dict[str, str]) -> None:
    """One line per run in the order they ran, with the load average before and after it: shows which runs
    other work slowed down. `columns` maps a heading to a format string over the run's fields."""
    ordered = sorted(((run["order"], side, run) for side, side_runs in runs.items() for run in side_runs))
    header = ["run", *columns, "load before -> after"]
    rows = [
        [f"{order + 1}. {side}", *(fmt.format(**run) for fmt in columns.values()),
         f"{run['load_before']:.1f} -> {run['load_after']:.1f}"]
        for order, side, run in ordered
    ]  # fmt: skip
    print_table(header, rows)


def accuracy_noise(acc_a: float, acc_b: float, n: int) -> float:
    """Two binomial standard errors of the difference of two accuracies measured on n images each."""
    import math

    return 2 * math.sqrt((acc_a * (1 - acc_a) + acc_b * (1 - acc_b)) / n)


# --------------------------------------------------------------------------------------------------------
# Arithmetic: FLOPs of a training step, the machine's matmul rate, a step's own rate
# --------------------------------------------------------------------------------------------------------
def training_flops_per_image(model, batch: dict) -> float:
    """FLOPs of forward + backward on `batch`, per image, as `torch.utils.flop_counter` counts them (matmuls,
    convolutions and attention; the optimizer's and the element-wise work are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.train()
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return counter.get_total_flops() / len(batch["pixel_values"])


def matmul_flops(size: int = 2048, reps: int = 5, device: str = "cpu", dtype=None) -> float:
    """FLOP/s of a dense `size`x`size` @ `size`x`size` matmul (torch's current thread count on the CPU): the
    best of `reps` after a warm-up, since the machine's peak is what the other figures are a fraction of."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def step_images_per_s(model, optimizer, batch: dict, min_s: float = 1.0, max_grad_norm: float = 1.0) -> float:
    """Images/s of forward + backward + gradient clipping + optimizer step + zero_grad on one fixed batch,
    as the Trainer's loop does them; steps repeat until `min_s` has passed (after one warm-up step)."""
    import torch

    model.train()
    sync = torch.cuda.synchronize if batch["pixel_values"].is_cuda else (lambda: None)

    def step():
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    sync()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_s:
        step()
        steps += 1
    sync()
    return steps * len(batch["pixel_values"]) / (time.perf_counter() - start)


def parse_repeated_comparison_args(
    argv,
    description: str,
    add_setup_arguments,
    *,
    epochs: tuple[float, float] = (3.0, 1.0),
    repeats: tuple[int, int] = (3, 1),
    quick_help: str = "1 epoch, one run per side: about 1 minute.",
):
    """Arguments shared by the ours-vs-peer benchmarks that alternate repeated runs. `epochs` and `repeats`
    are the defaults of a full and of a --quick run."""
    import argparse

    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help=quick_help)
    add_setup_arguments(parser)
    parser.add_argument(
        "--num_train_epochs", type=float, default=None, help=f"Default {epochs[0]:g} (quick: {epochs[1]:g})."
    )
    parser.add_argument("--batch_size", type=int, default=32, help="Train batch size; eval uses 4x.")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--workers", type=int, default=None, help="Dataloader workers for both (default: ours)."
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"Runs per side, alternating, seed + 0, 1, ... Default {repeats[0]} (quick: {repeats[1]}).",
    )
    parser.add_argument("--keep", action="store_true", help="Keep the run outputs and logs under bench_out/.")
    args = parser.parse_args(argv)
    if args.num_train_epochs is None:
        args.num_train_epochs = epochs[1] if args.quick else epochs[0]
    if args.repeats is None:
        args.repeats = repeats[1] if args.quick else repeats[0]
    return args


# --------------------------------------------------------------------------------------------------------
# The digits as an image folder with train / validation / test sub-folders
# --------------------------------------------------------------------------------------------------------
def digits_split_folder(root: str | Path, image_size: int = 32, fractions=(0.7, 0.15), seed: int = 0) -> Path:
    """scikit-learn's digits as `image_size`-px PNGs in root/{train,validation,test}/<digit>/, each class split
    `fractions` (train, validation; the rest is test) in a seeded order: what both the docs-style peer
    (imagefolder with its own splits) and our command read. Written once."""
    import random

    from hf_finetune.testing.quickstart import export_digits

    root = Path(root)
    marker = root / ".complete.json"
    settings = {"image_size": image_size, "fractions": list(fractions), "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return root
    flat = export_digits(root.parent / f"{root.name}-all", image_size, outside_material_dir=True)
    rng = random.Random(seed)
    shutil.rmtree(root, ignore_errors=True)
    for folder in sorted(p for p in flat.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.png"))
        rng.shuffle(files)
        n_train, n_val = int(len(files) * fractions[0]), int(len(files) * fractions[1])
        parts = {"train": files[:n_train], "validation": files[n_train : n_train + n_val],
                 "test": files[n_train + n_val :]}  # fmt: skip
        for split, part in parts.items():
            (root / split / folder.name).mkdir(parents=True, exist_ok=True)
            for path in part:
                shutil.copyfile(path, root / split / folder.name / path.name)
    marker.write_text(json.dumps(settings))
    return root


def launched(command: list[str], config: str | Path = "accelerate_configs/cpu.yaml") -> list[str]:
    """`command` (a `python ...` line) started by `accelerate launch --config_file config` instead."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / config)]
    return launcher + command[1:]  # `-m module ...` or `script.py ...`, as accelerate launch takes them
