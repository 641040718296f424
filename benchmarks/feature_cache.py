"""The feature cache: backbone forward passes per run (cold, warm, another classifier, a fused second
checkpoint), and peak memory while features are computed, against dataset size, next to the usual
collect-then-concatenate approach.

    .venv/bin/python benchmarks/feature_cache.py            # about 2 minutes on 2 CPU cores

Targets (printed with PASS/MISS, never asserted):
- a run whose features are cached does zero backbone forward passes, whatever the classifier;
- peak memory does not grow with dataset size beyond the feature matrix itself: between the smallest and the
  largest dataset, the growth of the process's anonymous (heap) memory stays within a few MiB, and the growth
  of its whole resident set within the growth of the feature matrix (whose pages are the memory-mapped .npy)
  plus that of the input data (its memory-mapped Arrow files, read as in any approach) plus a few MiB.

Part 1 runs the probe in this process on the quickstart digits with the tiny stand-in ViT (and a tiny ResNet
for fusion), counting backbone forward passes with `hf_finetune.testing.counters.count_backbone_forwards` (a global
hook on every transformers base model, independent of the probe's own counter).

Part 2 computes the features of N synthetic 32 px pictures (digits with random shifts and noise, an Arrow
dataset on disk, memory-mapped like any Hub dataset) with a one-layer ViT whose pooled output is 512 wide, so
that the feature matrix is big enough to see. Each measurement is a fresh subprocess with no dataloader
workers, so that the whole computation is in the one process measured. `ours` is
`features.extract_features` (batches written into an `open_memmap`'d .npy); `concatenate` keeps every
batch's features in a list and concatenates them at the end (the usual `torch.cat(outputs)`), then saves.
Peaks are sampled every 5 ms from /proc/self/status (RssAnon, RssFile) and compared with the values just
before the computation starts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)

OUT = _common.BENCH_OUT / "feature_cache"
MIB = 2**20
WIDE_DIM = 512
TOLERANCE_MIB = 8.0


# --------------------------------------------------------------------------------------------------------
# Part 1: forward passes per run
# --------------------------------------------------------------------------------------------------------
def forward_passes_per_run() -> list[bool]:
    from hf_finetune.probe.arguments import parse_probe_args
    from hf_finetune.probe.run import run_probe
    from hf_finetune.testing.counters import count_backbone_forwards
    from hf_finetune.testing.quickstart import build_stand_in_checkpoint, export_digits

    digits = export_digits(_common.BENCH_OUT / "digits", outside_material_dir=True)
    vit = build_stand_in_checkpoint(_common.BENCH_OUT / "probe-backbone-stand-in", outside_material_dir=True)
    resnet = build_stand_in_checkpoint(
        _common.BENCH_OUT / "probe-backbone-stand-in-resnet", arch="resnet", outside_material_dir=True
    )
    cache = OUT / "cache"
    shutil.rmtree(cache, ignore_errors=True)

    def probe(model: str, classifier: str) -> tuple[dict, int, float]:
        argv = [
            "--model_name_or_path", model,
            "--train_dir", str(digits),
            "--train_val_split", "0.15",
            "--train_test_split", "0.15",
            "--classifier", classifier,
            "--feature_cache_dir", str(cache),
            "--feature_batch_size", "128",
            "--output_dir", str(OUT / "run"),
            "--seed", "42",
            "--use_cpu", "true",
            "--dataloader_num_workers", "0",
            "--log_level", "warning",
            "--overwrite_output_dir", "true",
        ]  # fmt: skip
        start = time.perf_counter()
        with count_backbone_forwards() as passes:
            results = run_probe(*parse_probe_args(argv))
        return results, passes.batches, time.perf_counter() - start

    runs = [
        ("1st run, logistic_regression", str(vit), "logistic_regression"),
        ("2nd run, same settings", str(vit), "logistic_regression"),
        ("3rd run, classifier knn", str(vit), "knn"),
        ("4th run, classifier mlp", str(vit), "mlp"),
        ("5th run, fusion ViT + ResNet", f"{vit},{resnet}", "logistic_regression"),
    ]
    rows, checks = [], []
    for index, (name, model, classifier) in enumerate(runs):
        results, passes, seconds = probe(model, classifier)
        if index in (1, 2, 3):
            checks.append(passes == 0)
        rows.append(
            [
                name,
                f"{seconds:.1f} s",
                str(passes),
                str(results["backbone_forward_passes"]),
                f"{results['feature_cache_hits']} / {results['feature_cache_misses']}",
                f"{results['test_accuracy']:.4f}",
            ]
        )
    print(
        "Part 1: backbone forward passes per run (quickstart digits, stand-in ViT; fusion adds a tiny ResNet)"
    )
    _common.print_table(
        ["run", "run time", "passes (hook)", "passes (probe)", "cache hits / misses", "test acc"], rows
    )
    print(f"  runs 2-4 do no backbone forward pass: {_common.verdict(all(checks))}")
    print("  (run 5 computes the ResNet's features only: the ViT's come from the cache)\n")
    return checks


# --------------------------------------------------------------------------------------------------------
# Part 2: memory against dataset size, one subprocess per measurement
# --------------------------------------------------------------------------------------------------------
def make_dataset(rows: int) -> Path:
    """An Arrow dataset on disk of `rows` 32 px pictures in ten classes (built once, reused)."""
    folder = OUT / f"data-{rows}"
    if (folder / "dataset_info.json").is_file():
        return folder
    import numpy as np
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits

    digits = load_digits()

    def generate():
        rng = np.random.default_rng(rows)
        for i in range(rows):
            k = i % len(digits.images)
            pixels = np.pad(255 - digits.images[k] / 16 * 255, 2)
            pixels = np.roll(pixels, tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
            pixels = (pixels + rng.normal(0, 8, pixels.shape)).clip(0, 255).astype(np.uint8)
            image = PILImage.fromarray(pixels).resize((32, 32), PILImage.Resampling.BICUBIC).convert("RGB")
            yield {"image": image, "label": int(digits.target[k])}

    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    Dataset.from_generator(generate, features=features, cache_dir=str(OUT / "hf-cache")).save_to_disk(folder)
    return folder


def build_wide_checkpoint() -> Path:
    folder = OUT / "wide-vit"
    if not (folder / "config.json").is_file():
        import torch
        from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

        config = ViTConfig(hidden_size=WIDE_DIM, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8, num_labels=10)  # fmt: skip
        torch.manual_seed(0)
        ViTForImageClassification(config).save_pretrained(folder)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _status() -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def _measure(argv: list[str]) -> None:
    """Subprocess: compute the features of one dataset one way; print the memory figures as JSON."""
    import threading

    import numpy as np
    from datasets import load_from_disk

    from hf_finetune.config import ModelArguments
    from hf_finetune.probe.cache import FeatureCache
    from hf_finetune.probe.features import Backbone, embed_batch, extract_features

    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--mode", choices=["ours", "concatenate"], required=True)
    parser.add_argument("--cache", required=True)
    args = parser.parse_args(argv)

    dataset = load_from_disk(args.data)
    labels = dataset.features["label"].names
    backbone = Backbone(ModelArguments(model_name_or_path=args.checkpoint))
    model = backbone.model(labels)
    # Warm up one batch so that allocator pools and lazy imports are in the baseline, not in the growth.
    first = [backbone.eval_transform(dataset[i]["image"]) for i in range(64)]
    import torch

    embed_batch(model, torch.stack(first), args.checkpoint)

    baseline = _status()
    peaks = dict(baseline)
    done = threading.Event()

    def sample():
        while not done.is_set():
            for key, value in _status().items():
                peaks[key] = max(peaks[key], value)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if args.mode == "ours":
        extract_features(backbone, {"train": dataset}, "image", "label", labels, FeatureCache(args.cache),
                         batch_size=64, num_workers=0)  # fmt: skip
    else:
        from hf_finetune.probe.features import pixel_loader

        chunks = [
            embed_batch(model, batch["pixel_values"], args.checkpoint)
            for batch in pixel_loader(dataset, "image", backbone.eval_transform, 64, 0)
        ]
        matrix = torch.cat(chunks).numpy()
        Path(args.cache).mkdir(parents=True, exist_ok=True)
        np.save(Path(args.cache) / "features.npy", matrix)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    for key, value in _status().items():
        peaks[key] = max(peaks[key], value)
    growth = {key: (peaks[key] - baseline[key]) / MIB for key in baseline}
    print(json.dumps({"rows": len(dataset), "seconds": seconds, "growth_mib": growth}))


def memory_against_size(sizes: list[int]) -> list[bool]:
    checkpoint = build_wide_checkpoint()
    measured: dict[tuple[str, int], dict] = {}
    for rows in sizes:
        data = make_dataset(rows)
        for mode in ("ours", "concatenate"):
            cache = OUT / f"cache-{mode}-{rows}"
            shutil.rmtree(cache, ignore_errors=True)
            cmd = [sys.executable, __file__, "_measure", "--data", str(data), "--checkpoint", str(checkpoint),
                   "--mode", mode, "--cache", str(cache)]  # fmt: skip
            done = subprocess.run(
                cmd, capture_output=True, text=True, env=_common.offline_env(), cwd=_common.REPO
            )
            if done.returncode != 0:
                sys.exit(f"measurement failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
            measured[mode, rows] = json.loads(done.stdout.strip().splitlines()[-1])
            shutil.rmtree(cache, ignore_errors=True)

    def matrix_mib(rows: int) -> float:
        return rows * WIDE_DIM * 4 / MIB

    def data_mib(rows: int) -> float:
        # The Arrow files are memory-mapped and read once: their pages count as mapped-file memory in any
        # approach (they are the input, and the kernel can drop them at will).
        return sum(p.stat().st_size for p in (OUT / f"data-{rows}").glob("*.arrow")) / MIB

    table = []
    for mode in ("ours", "concatenate"):
        for rows in sizes:
            m = measured[mode, rows]["growth_mib"]
            table.append(
                [mode, f"{rows:,}", f"{data_mib(rows):.1f}", f"{matrix_mib(rows):.1f}", f"{m['RssAnon']:.1f}",
                 f"{m['RssFile']:.1f}", f"{m['VmRSS']:.1f}", f"{measured[mode, rows]['seconds']:.1f} s"]
            )  # fmt: skip
    print(f"Part 2: peak memory growth while computing features ({WIDE_DIM}-wide pooled output, MiB)")
    header = [
        "how",
        "images",
        "data (Arrow)",
        "features",
        "heap (RssAnon)",
        "mapped files",
        "total (VmRSS)",
        "time",
    ]
    _common.print_table(header, table)
    small, large = sizes[0], sizes[-1]
    ours_small, ours_large = measured["ours", small]["growth_mib"], measured["ours", large]["growth_mib"]
    anon_growth = ours_large["RssAnon"] - ours_small["RssAnon"]
    total_growth = ours_large["VmRSS"] - ours_small["VmRSS"]
    matrix_growth = matrix_mib(large) - matrix_mib(small)
    data_growth = data_mib(large) - data_mib(small)
    concat_growth = (
        measured["concatenate", large]["growth_mib"]["RssAnon"]
        - measured["concatenate", small]["growth_mib"]["RssAnon"]
    )
    allowed = matrix_growth + data_growth + TOLERANCE_MIB
    checks = [anon_growth <= TOLERANCE_MIB, total_growth <= allowed]
    print(f"  from {small:,} to {large:,} images the feature matrix grows by {matrix_growth:.1f} MiB and the "
          f"memory-mapped input data by {data_growth:.1f} MiB;")  # fmt: skip
    print(f"  ours: heap +{anon_growth:.1f} MiB (target <= {TOLERANCE_MIB:.0f}): {_common.verdict(checks[0])}; "
          f"total +{total_growth:.1f} MiB (target <= features + data + {TOLERANCE_MIB:.0f} = {allowed:.1f}): "
          f"{_common.verdict(checks[1])}")  # fmt: skip
    print(f"  concatenate: heap +{concat_growth:.1f} MiB, growing with the dataset (every batch's features held "
          "until the end, then concatenated)")  # fmt: skip
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[2000, 12000], help="dataset sizes, in images"
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    print("Feature cache benchmark")
    print(f"  {_common.machine()}\n")
    forward_passes_per_run()
    memory_against_size(sorted(args.sizes))
    print(f"  {_common.load()}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_measure":
        _measure(sys.argv[2:])
    else:
        main()
