"""Big image folders: time to a ready training dataset and peak memory of this project's folder index against
`load_dataset("imagefolder", data_dir=...)`, on a generated folder of 200,000 small files (8x8 PNGs, 100
classes), each side in a fresh process with a fresh datasets cache, in the same invocation.

    .venv/bin/python benchmarks/big_folder.py            # 200,000 files (first run writes them, ~1 min)
    .venv/bin/python benchmarks/big_folder.py --quick    # 20,000 files

Printed per side: seconds from the call to a usable `Dataset` (imports excluded, measured inside the process),
peak resident memory of the process (kernel figure) and that peak above the process's memory after its imports,
per file. For ours also the pre-training image check (`scan_images`: every file read and decoded, in chunks over
processes) as a second figure, since `imagefolder` does not check anything. Target: imagefolder / ours >= 5x.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import BENCH_OUT, check_ok, load, offline_env, print_table, run_measured, verdict

CLASSES = 100
TARGET = 5.0


def make_folder(root: Path, files: int) -> Path:
    """`files` 8x8 PNGs in CLASSES class folders, written once and reused."""
    from PIL import Image

    done = root / ".complete"
    if done.is_file() and done.read_text() == str(files):
        return root
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (40, 80, 120)).save(buffer, "PNG")
    data = buffer.getvalue()
    for c in range(CLASSES):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"class{i % CLASSES:03d}" / f"{i:07d}.png").write_bytes(data)
    done.write_text(str(files))
    return root


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def side(which: str, folder: str, result: str) -> None:
    """One side, in its own process: what it took to get the training dataset (and, for ours, the check)."""
    import datasets  # noqa: F401  (imports are not what is measured)

    from hf_finetune.data.folders import load_image_folders
    from hf_finetune.data.scan import scan_images

    baseline = _rss()
    start = time.perf_counter()
    if which == "ours":
        train = load_image_folders({"train": folder}, None)["train"]
    else:
        train = datasets.load_dataset("imagefolder", data_dir=folder)["train"]
    ready = time.perf_counter() - start
    figures = {"ready_s": ready, "rows": len(train), "baseline_rss": baseline, "after_rss": _rss()}
    if which == "ours":
        start = time.perf_counter()
        scan = scan_images(datasets.DatasetDict({"train": train}), "image")
        figures.update(check_s=time.perf_counter() - start, bad=len(scan.bad))
    Path(result).write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--quick", action="store_true", help="20,000 files")
    parser.add_argument("--side", choices=["ours", "imagefolder"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return side(args.side, args.folder, args.result)
    files = 20_000 if args.quick else args.files
    print(load())
    folder = make_folder(BENCH_OUT / f"big_folder_{files}", files)
    rows, measured = [], {}
    with tempfile.TemporaryDirectory(dir=BENCH_OUT) as scratch:
        for which in ("imagefolder", "ours"):
            result = Path(scratch) / f"{which}.json"
            cmd = [
                sys.executable,
                __file__,
                "--side",
                which,
                "--folder",
                str(folder),
                "--result",
                str(result),
            ]
            stats = run_measured(
                cmd, Path(scratch) / f"{which}.log", offline_env(Path(scratch) / f"{which}-cache")
            )
            check_ok(stats, which)
            figures = json.loads(result.read_text())
            measured[which] = (stats, figures)
            above = stats.peak_rss_bytes - figures["baseline_rss"]
            rows.append(
                [
                    which,
                    f"{figures['rows']:,}",
                    f"{figures['ready_s']:.1f} s",
                    f"{figures.get('check_s', float('nan')):.1f} s" if "check_s" in figures else "-",
                    f"{stats.peak_rss_bytes / 2**20:.0f} MiB",
                    f"{above / figures['rows']:.0f} B",
                ]
            )
    print_table(["side", "files", "to dataset", "image check", "peak RSS", "peak above imports / file"], rows)
    ratio = measured["imagefolder"][1]["ready_s"] / measured["ours"][1]["ready_s"]
    print(
        f"imagefolder / ours, time to a ready training dataset: {ratio:.1f}x (target >= {TARGET:g}x) {verdict(ratio >= TARGET)}"
    )
    print(load())


if __name__ == "__main__":
    main()
