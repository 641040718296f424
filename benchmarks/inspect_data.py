"""`hf-finetune inspect` on the digits with planted faults, on Google's real ImageNet EfficientNet-Lite0.

    .venv/bin/python benchmarks/inspect_data.py            # about 3 minutes on 2 CPU cores

The digits (1,797 real scans) are split, stratified, into train / validation / test image folders (1,257 /
270 / 270). Planted in train: the labels of 30 pictures flipped (each file moved into another class's folder)
and 10 test pictures copied into train, re-encoded as JPEG (quality 90) and resized from 32 to 34-36 px.

Printed, each with its target (PASS/MISS, never asserted):
- label errors: recall and precision of the 30 planted flips among the top 60 suspects (target recall >= 0.7);
- leakage: planted train-test pairs found (target all 10) and other cross-split pairs (target <= 2);
- time: the inspection against the probe alone, both with every feature cached (target <= 2x). Three ways:
  within one inspection call, the probe's fit it starts with (`fit_probe`: data, cached features, the classifier
  chosen on validation: exactly what a probe run fits) against the whole call and its report, timed back to
  back, so that other jobs on the machine weigh on both sides alike (the target's line); the probe's fit alone
  against the inspection with its report, timed apart (noisy on a shared machine); and `hf-finetune probe`
  (which also exports the model and writes its reports) against `hf-finetune inspect`, end to end;
- the held-out pair set the near-duplicate thresholds are checked on: 200 validation pictures, each against a
  copy of itself re-encoded and resized the same way (put in a test split of their own), and against the other
  pictures of train + validation: for pairs of thresholds (feature cosine, thumbnail correlation), the share of
  copies passing both, and of originals with some distinct picture passing both.
"""

from __future__ import annotations

import sys

# This file's folder comes first on sys.path when it is run as a script, where its name would hide the standard
# library's `inspect` from every module that imports it: the folder goes to the end, after the standard library.
sys.path.append(sys.path.pop(0))

import io  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import _common  # noqa: E402  (benchmarks/ is not a package)

OUT = _common.BENCH_OUT / "inspect"
IMAGE_SIZE = 64
FLIPS, LEAKS, TOP = 30, 10, 60
SEED = 0


def reencoded(path: Path, rng) -> bytes:
    """The picture as a leaked copy usually is: resized by a few pixels and saved as a JPEG."""
    from PIL import Image

    with Image.open(path) as image:
        side = int(rng.integers(34, 37))
        copy = image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    copy.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def build_data(root: Path):
    """Clean train / validation / test folders, then the planted faults; returns (flipped, leaked) names."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    from hf_finetune.testing.quickstart import export_digits

    digits = export_digits(_common.BENCH_OUT / "digits", outside_material_dir=True)
    files = sorted(digits.glob("*/*.png"))
    classes = [f.parent.name for f in files]
    train, rest = train_test_split(files, test_size=540, stratify=classes, random_state=SEED)
    validation, test = train_test_split(
        rest, test_size=270, stratify=[f.parent.name for f in rest], random_state=SEED
    )
    shutil.rmtree(root, ignore_errors=True)
    for split, members in (("train", train), ("validation", validation), ("test", test)):
        for f in members:
            target = root / split / f.parent.name / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
    rng = np.random.default_rng(SEED)
    names = sorted({f.parent.name for f in files})
    flipped = []
    for index in rng.choice(len(train), FLIPS, replace=False):
        f = train[index]
        wrong = rng.choice([n for n in names if n != f.parent.name])
        (root / "train" / wrong).mkdir(exist_ok=True)
        (root / "train" / f.parent.name / f.name).rename(root / "train" / wrong / f.name)
        flipped.append(f"{wrong}/{f.name}")
    leaked = []
    for index in rng.choice(len(test), LEAKS, replace=False):
        f = test[index]
        copy = root / "train" / f.parent.name / f"leaked-{f.stem}.jpg"
        copy.write_bytes(reencoded(f, rng))
        leaked.append((f"{f.parent.name}/{copy.name}", f"{f.parent.name}/{f.name}"))
    return validation, flipped, leaked


def argv_for(data: Path, model: Path, cache: Path, out: Path, test: str = "test") -> list[str]:
    return [
        "--model_name_or_path", str(model),
        "--train_dir", str(data / "train"),
        "--validation_dir", str(data / "validation"),
        "--test_dir", str(data / test),
        "--feature_cache_dir", str(cache),
        "--feature_batch_size", "128",
        "--output_dir", str(out),
        "--seed", str(SEED),
        "--use_cpu", "true",
        "--dataloader_num_workers", "0",
        "--log_level", "warning",
    ]  # fmt: skip


def threshold_check(data: Path, validation: list[Path], model: Path, cache: Path) -> None:
    """The held-out pair set (see the module docstring)."""
    import numpy as np

    from hf_finetune.commands.inspect import parse_inspect_args
    from hf_finetune.inspection.duplicates import unit_rows
    from hf_finetune.inspection.run import inspect_data

    rng = np.random.default_rng(SEED + 1)
    originals = [validation[i] for i in sorted(rng.choice(len(validation), 200, replace=False))]
    copies = data / "pair_copies"
    shutil.rmtree(copies, ignore_errors=True)
    for f in originals:
        target = copies / f.parent.name / f"{f.stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(reencoded(f, rng))
    # Clean train (the planted faults removed) would change the features' standardisation only slightly;
    # the pair set uses this run's own train, validation and the copies as its test split.
    args = parse_inspect_args(argv_for(data, model, cache, OUT / "pairs", test="pair_copies"))
    inspection = inspect_data(*args)
    from hf_finetune.inspection.duplicates import pixel_thumbnail

    x = {split: unit_rows(v) for split, v in inspection.features.items()}
    names = {split: inspection.names[split] for split in x}
    val_row = {name: i for i, name in enumerate(names["validation"])}
    pool = np.concatenate([x["train"], x["validation"]])
    pool_values = [*inspection.values["train"], *inspection.values["validation"]]
    thumbs: dict[int, np.ndarray] = {}

    def pool_thumb(k: int) -> np.ndarray:
        if k not in thumbs:
            thumbs[k] = pixel_thumbnail(pool_values[k])
        return thumbs[k]

    copies, strangers = (
        [],
        [],
    )  # (feature cosine, pixel correlation) of each copy / of each distinct candidate
    for row, name in enumerate(names["test"]):
        original = val_row[name.replace(".jpg", ".png")]
        k_original = len(x["train"]) + original
        copy_thumb = pixel_thumbnail(inspection.values["test"][row])
        copies.append(
            (float(x["test"][row] @ x["validation"][original]), float(copy_thumb @ pool_thumb(k_original)))
        )
        sims = pool @ x["validation"][original]
        sims[k_original] = -1.0  # not itself
        # Every distinct picture the features would make a candidate at the lowest threshold shown, and the
        # nearest one in any case.
        for k in sorted(set(np.flatnonzero(sims >= 0.55).tolist()) | {int(sims.argmax())}):
            strangers.append((original, float(sims[k]), float(pool_thumb(k) @ pool_thumb(k_original))))
    feature, pixel = np.array(copies).T
    print("\nHeld-out pair set: 200 validation pictures vs a re-encoded, resized copy / the other pictures of train +"
          " validation")  # fmt: skip
    print(f"  copies: feature cosine min {feature.min():.3f}, median {np.median(feature):.3f}; thumbnail correlation "
          f"min {pixel.min():.4f}, median {np.median(pixel):.4f}")  # fmt: skip
    nearest = [max(s[1] for s in strangers if s[0] == o) for o in sorted({s[0] for s in strangers})]
    print(f"  nearest distinct picture: feature cosine median {np.median(nearest):.3f}, max {max(nearest):.3f}; "
          f"thumbnail correlation of distinct candidates (cosine >= 0.55) max "
          f"{max((s[2] for s in strangers if s[1] >= 0.55), default=float('nan')):.4f}")  # fmt: skip
    print("  cosine >= | thumbnails >= | copies found | originals with a distinct picture passing both")
    for threshold in (0.55, 0.6, 0.65, 0.7, 0.75, 0.8):
        for pixels in (0.0, 0.98, 0.99, 0.995):
            found = np.mean((feature >= threshold) & (pixel >= pixels))
            passing = {s[0] for s in strangers if s[1] >= threshold and s[2] >= pixels}
            print(f"  {threshold:9.2f} | {pixels:13.3f} | {found:12.3f} | {len(passing) / len(copies):.3f}")


def leakage_by_threshold(inspection, leaked) -> None:
    """Planted pairs found and other cross-split pairs at other feature thresholds, without and with the pixel
    check at the default correlation (the same whitened features; thumbnails of the candidates only)."""
    import numpy as np

    from hf_finetune.inspection.duplicates import pixel_thumbnail, unit_rows

    x = {split: unit_rows(v) for split, v in inspection.features.items()}
    row = {split: {name: i for i, name in enumerate(names)} for split, names in inspection.names.items()}
    planted = {(row["train"][a], row["test"][b]) for a, b in leaked}
    blocks = {
        pair: x[pair[0]] @ x[pair[1]].T
        for pair in (("train", "validation"), ("train", "test"), ("validation", "test"))
    }
    thumbs = {}

    def pixels(split, i):
        if (split, i) not in thumbs:
            thumbs[split, i] = pixel_thumbnail(inspection.values[split][i])
        return thumbs[split, i]

    pixel_threshold = inspection.pixel_threshold or 0.99
    print(f"  planted leakage found / other cross-split pairs, by feature threshold (features alone; and with "
          f"thumbnails >= {pixel_threshold}):")  # fmt: skip
    cells = []
    for threshold in (0.55, 0.60, 0.65, 0.70, 0.75, 0.80, 0.84):
        alone = [0, 0]
        checked = [0, 0]
        for (a, b), sims in blocks.items():
            for i, j in zip(*np.nonzero(sims >= threshold), strict=True):
                is_planted = (a, b) == ("train", "test") and (int(i), int(j)) in planted
                alone[0 if is_planted else 1] += 1
                if float(pixels(a, int(i)) @ pixels(b, int(j))) >= pixel_threshold:
                    checked[0 if is_planted else 1] += 1
        cells.append(f"{threshold:.2f}: {alone[0]}/{alone[1]} ({checked[0]}/{checked[1]})")
    print("    " + ", ".join(cells))
    found = {(p.index_a, p.index_b) for p in inspection.pairs if (p.split_a, p.split_b) == ("train", "test")}
    for a, b in sorted(planted):
        tag = "" if (a, b) in found else "  (missed)"
        print(f"    planted {inspection.names['train'][a]} ~ test {inspection.names['test'][b]}: feature cosine "
              f"{blocks[('train', 'test')][a, b]:.3f}, thumbnails {float(pixels('train', a) @ pixels('test', b)):.4f}{tag}")  # fmt: skip


def main() -> None:
    from hf_finetune.commands.inspect import parse_inspect_args
    from hf_finetune.inspection.report import write_report
    from hf_finetune.inspection.run import inspect_data, run_inspect
    from hf_finetune.probe.arguments import parse_probe_args
    from hf_finetune.probe.run import fit_probe, run_probe
    from hf_finetune.testing.real_weights import convert_efficientnet_lite

    model = convert_efficientnet_lite(
        "lite0", OUT / f"lite0-{IMAGE_SIZE}px", image_size=IMAGE_SIZE, crop_pct=1.0
    )
    data = OUT / "data"
    validation, flipped, leaked = build_data(data)
    cache = OUT / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    argv = argv_for(data, model, cache, OUT / "report")

    cold = time.perf_counter()
    inspection = inspect_data(*parse_inspect_args(argv))
    cold = time.perf_counter() - cold
    # Warm: every feature cached. Twice each, best of: the probe's fit alone against the inspection with its
    # report, and the two commands end to end (`hf-finetune probe`, which also exports the model and writes its
    # reports, against `hf-finetune inspect`).
    fit_times, inspect_times, probe_command, inspect_command, within = [], [], [], [], []
    for _ in range(2):
        model_args, data_args, probe_args, _, training_args = parse_inspect_args(argv)
        start = time.perf_counter()
        fit_probe(model_args, data_args, probe_args, training_args)
        fit_times.append(time.perf_counter() - start)
        args = parse_inspect_args(argv)
        start = time.perf_counter()
        inspection = inspect_data(*args)
        write_report(OUT / "report", inspection)
        inspect_times.append(time.perf_counter() - start)
        within.append((inspection.seconds["probe"], inspect_times[-1]))
        probe_argv = [*argv_for(data, model, cache, OUT / "probe"), "--overwrite_output_dir", "true"]
        start = time.perf_counter()
        run_probe(*parse_probe_args(probe_argv))
        probe_command.append(time.perf_counter() - start)
        start = time.perf_counter()
        run_inspect(*parse_inspect_args(argv))
        inspect_command.append(time.perf_counter() - start)

    names = inspection.names["train"]
    top = [names[row] for row in inspection.issues.ranked[:TOP]]
    hits = len(set(top) & set(flipped))
    recall, precision = hits / FLIPS, hits / max(1, len(top))
    cross = {(inspection.names[p.split_a][p.index_a], p.split_b, inspection.names[p.split_b][p.index_b])
             for p in inspection.pairs if p.cross_split}  # fmt: skip
    planted = {(train, "test", test) for train, test in leaked}
    found, false_pairs = len(cross & planted), len(cross - planted)
    probe_s, inspect_s = min(fit_times), min(inspect_times)
    probe_cmd, inspect_cmd = min(probe_command), min(inspect_command)

    print(f"\nDigits {IMAGE_SIZE}px on the real EfficientNet-Lite0, {len(names)} training pictures with {FLIPS} "
          f"flipped labels and {LEAKS} leaked test pictures; feature cosine >= {inspection.threshold}, thumbnails >= "
          f"{inspection.pixel_threshold}")  # fmt: skip
    print(f"  label errors: {len(inspection.issues.ranked)} suspects; top {TOP}: {hits} planted -> recall "
          f"{recall:.2f} (target >= 0.7: {'PASS' if recall >= 0.7 else 'MISS'}), precision {precision:.2f}")  # fmt: skip
    print(f"  leakage: {found} of {LEAKS} planted pairs found (target all: {'PASS' if found == LEAKS else 'MISS'}), "
          f"{false_pairs} other cross-split pair(s) (target <= 2: {'PASS' if false_pairs <= 2 else 'MISS'})")  # fmt: skip
    pixels = {(inspection.names[p.split_a][p.index_a], p.split_b, inspection.names[p.split_b][p.index_b]):
              (p.similarity, p.pixel_similarity) for p in inspection.pairs if p.cross_split}  # fmt: skip
    for pair in sorted(cross - planted):
        print(f"    other pair: train {pair[0]} ~ {pair[1]} {pair[2]} (cosine {pixels[pair][0]:.3f}, thumbnails "
              f"{pixels[pair][1]})")  # fmt: skip
    print(f"  within-split duplicate pairs: {sum(not p.cross_split for p in inspection.pairs)}")
    fits, wholes = zip(*within, strict=True)
    fit_in, whole = sum(fits) / len(fits), sum(wholes) / len(wholes)  # the mean of the repeats, both sides
    print(f"  time, features cached, within one inspection: its probe fit {fit_in:.1f} s, the inspection + report "
          f"{whole:.1f} s -> {whole / fit_in:.2f}x (target <= 2x: {'PASS' if whole <= 2 * fit_in else 'MISS'})")  # fmt: skip
    print(f"  time, features cached, timed apart: the probe's fit {probe_s:.1f} s, inspection + report {inspect_s:.1f} s -> "
          f"{inspect_s / probe_s:.2f}x; "
          f"parts {inspection.seconds}")  # fmt: skip
    print(f"  commands end to end, features cached: hf-finetune probe {probe_cmd:.1f} s, hf-finetune inspect "
          f"{inspect_cmd:.1f} s -> {inspect_cmd / probe_cmd:.2f}x (target <= 2x: "
          f"{'PASS' if inspect_cmd <= 2 * probe_cmd else 'MISS'}); cold inspection (features computed) {cold:.1f} s")  # fmt: skip
    leakage_by_threshold(inspection, leaked)
    threshold_check(data, validation, model, cache)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="accepted for `make bench`; this benchmark has one size (~3 min)"
    )
    parser.parse_args()
    main()
