"""Shared pieces of the benchmarks: image folders cut from scikit-image's photographs, a tiny checkpoint,
subprocess runs measured for wall time and peak resident memory, and the side-by-side report.

Benchmarks compare two things measured in the same invocation and report the ratio, never an absolute
figure alone: two runs on one noisy machine agree far better than two machines do.
"""

from __future__ import annotations

import contextlib
import json
import os
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


def make_photo_folder(
    root: str | Path,
    per_class: dict[str, int],
    classes: tuple[str, ...] = PHOTOS,
    size: tuple[int, int] = (640, 480),
    area: tuple[float, float] = (0.15, 0.6),
    noise: float = 3.0,
    quality: int = 90,
    seed: int = 0,
) -> Path:
    """Write root/<split>/<photo>/<n>.jpg: `per_class[split]` random views of each photo per split.

    The folder is reused when a previous call with the same settings completed (a marker file records them).
    """
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
    import numpy as np

    start = time.perf_counter()
    total = 0
    for class_index, name in enumerate(classes):
        photo = load_photo(name)
        for split_index, (split, count) in enumerate(per_class.items()):
            rng = np.random.default_rng([seed, class_index, split_index])
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                view = _random_view(photo, rng, size, area, noise)
                view.save(folder / f"{i:05d}.jpg", quality=quality)
            total += count
    marker.write_text(json.dumps(settings))
    print(f"  wrote {total} JPEGs of {size[0]}x{size[1]} to {root} in {time.perf_counter() - start:.0f} s")
    return root


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

    from hf_finetune.tiny import build_tiny_checkpoint

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


def check_ok(stats: RunStats, what: str) -> None:
    """Stop the benchmark with the end of the run's log when the run failed."""
    if stats.returncode != 0:
        tail = "\n".join(stats.log.read_text(errors="replace").splitlines()[-40:])
        sys.exit(f"{what} failed (exit status {stats.returncode}); end of {stats.log}:\n{tail}")


def read_results(output_dir: str | Path) -> dict:
    """The metrics a Trainer run wrote with `save_metrics` (train, eval and test together)."""
    return json.loads((Path(output_dir) / "all_results.json").read_text())


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
