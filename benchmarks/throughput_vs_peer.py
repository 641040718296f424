"""Full fine-tune throughput (images/s) of our pipeline against a plain script written the way the Hugging Face
docs write it, same checkpoint, data, epochs, batch size, learning rate and seed, measured in one invocation.

    .venv/bin/python benchmarks/throughput_vs_peer.py           # about 4 minutes on 2 idle CPU cores
    .venv/bin/python benchmarks/throughput_vs_peer.py --quick   # about 1 minute

(The first run also writes the images, 1 to 2 minutes. On a machine busy with other jobs everything takes
several times longer and the figures are noisy: the load average is printed before and after.)

Target: ours / peer training images per second >= 1.0, and our test accuracy within noise of the peer's
(no more than two binomial standard errors of the difference below it). Targets are printed with PASS/MISS,
never asserted.

Data: an image folder (train / validation / test, one sub-folder per class) of 640x480 JPEGs, each a random
crop of one of scikit-image's bundled photographs (the class), flipped, colour-jittered and lightly noised;
written once to bench_out/ and reused. Checkpoint: a tiny randomly initialised ViT (hf_finetune.testing.tiny) at
128 px, saved like a Hub download with a label set of its own, so both sides replace the classifier.

Ours is the real command line (`python -m hf_finetune.commands.cli train ...`) with its defaults. The peer is
`peer_main` below: the transformers docs' image-classification tutorial (imagefolder, AutoImageProcessor,
torchvision Compose(RandomResizedCrop, ToTensor, Normalize) over examples in `set_transform`,
DefaultDataCollator, AutoModelForImageClassification with label2id/id2label, TrainingArguments with
remove_unused_columns=False and the tutorial's per-epoch evaluation, saving and best-model reload). Three
departures from the tutorial, none of which slows the peer: validation and test images get the deterministic
Resize + CenterCrop of transformers' run_image_classification.py instead of the tutorial's random crop (so
that the accuracies compare), the seed is set before the new classifier is drawn (as that script does), and
accuracy is computed with numpy instead of `evaluate.load`, which needs the network. Each side runs in a fresh subprocess with a fresh datasets cache and the same dataloader worker
count (our default for this machine unless --workers is given). Throughput is
train images x epochs / the Trainer's train_runtime (which includes the per-epoch evaluation and checkpoint
on both sides). The full run does each side twice, in the order ours, peer, peer, ours, so that a drift in
the machine's speed hits both alike, and compares the medians; --quick runs each side once.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402  (benchmarks/ is not a package)

PEER_COMMAND = "peer"


# --------------------------------------------------------------------------------------------------------
# The peer: the docs' tutorial as a plain script
# --------------------------------------------------------------------------------------------------------
def peer_main(argv: list[str]) -> None:
    """https://huggingface.co/docs/transformers/tasks/image_classification, on a local image folder."""
    parser = argparse.ArgumentParser(prog="throughput_vs_peer.py peer")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_train_epochs", type=float, required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, required=True)
    parser.add_argument("--per_device_eval_batch_size", type=int, required=True)
    parser.add_argument("--learning_rate", type=float, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--dataloader_num_workers", type=int, required=True)
    # The tutorial saves every epoch and reloads the best model at the end; a run may turn both off.
    parser.add_argument("--save_strategy", default="epoch")
    parser.add_argument("--load_best_model_at_end", default="true", choices=["true", "false"])
    args = parser.parse_args(argv)

    import numpy as np
    from datasets import load_dataset
    from torchvision.transforms import CenterCrop, Compose, RandomResizedCrop, Resize, ToTensor
    from transformers import (
        AutoImageProcessor,
        AutoModelForImageClassification,
        DefaultDataCollator,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    # As transformers' run_image_classification.py does (the tutorial does not): the new classifier is drawn
    # before the Trainer seeds anything, so without this the peer's accuracy changes from run to run.
    set_seed(args.seed)

    # Load the data
    images = load_dataset("imagefolder", data_dir=args.data_dir)
    labels = images["train"].features["label"].names
    label2id, id2label = {}, {}
    for i, label in enumerate(labels):
        label2id[label] = str(i)
        id2label[str(i)] = label

    # Preprocess
    image_processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    normalize, size = peer_normalize_and_size(image_processor)
    _transforms = Compose([RandomResizedCrop(size), ToTensor(), normalize])
    _eval_transforms = Compose([Resize(size), CenterCrop(size), ToTensor(), normalize])

    def transforms(examples):
        examples["pixel_values"] = [_transforms(img.convert("RGB")) for img in examples["image"]]
        del examples["image"]
        return examples

    def eval_transforms(examples):
        examples["pixel_values"] = [_eval_transforms(img.convert("RGB")) for img in examples["image"]]
        del examples["image"]
        return examples

    images["train"].set_transform(transforms)
    images["validation"].set_transform(eval_transforms)
    images["test"].set_transform(eval_transforms)
    data_collator = DefaultDataCollator()

    # Evaluate
    def compute_metrics(eval_pred):
        predictions, references = eval_pred
        return {"accuracy": float(np.mean(np.argmax(predictions, axis=1) == references))}

    # Train
    model = AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path,
        num_labels=len(labels),
        id2label=id2label,
        label2id=label2id,
        ignore_mismatched_sizes=True,
    )
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        remove_unused_columns=False,
        eval_strategy="epoch",
        save_strategy=args.save_strategy,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size,
        num_train_epochs=args.num_train_epochs,
        load_best_model_at_end=args.load_best_model_at_end == "true",
        metric_for_best_model="accuracy",
        seed=args.seed,
        dataloader_num_workers=args.dataloader_num_workers,
        report_to="none",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        data_collator=data_collator,
        train_dataset=images["train"],
        eval_dataset=images["validation"],
        processing_class=image_processor,
        compute_metrics=compute_metrics,
    )
    train_result = trainer.train()
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_metrics("test", trainer.evaluate(images["test"], metric_key_prefix="test"))


def peer_normalize_and_size(image_processor):
    """The tutorial's Normalize and crop size from the processor: `image_mean` / `size` for transformers'
    processors, and for a timm checkpoint (TimmWrapperImageProcessor) its `data_config`, as the timm
    integration's docs read them."""
    from torchvision.transforms import Normalize

    config = getattr(image_processor, "data_config", None)
    if config is not None:
        return Normalize(mean=config["mean"], std=config["std"]), tuple(config["input_size"][1:])
    normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    size = (
        image_processor.size["shortest_edge"]
        if "shortest_edge" in image_processor.size
        else (image_processor.size["height"], image_processor.size["width"])
    )
    return normalize, size


# --------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------
def add_setup_arguments(parser) -> None:
    parser.add_argument(
        "--arch", default="vit", help="Tiny architecture of hf_finetune.testing.tiny (default vit)."
    )
    parser.add_argument("--image_size", type=int, default=128, help="Model input size in pixels.")
    parser.add_argument("--classes", type=int, default=len(_common.PHOTOS), help="Number of photos/classes.")
    parser.add_argument("--train_per_class", type=int, default=None, help="Default 250 (quick: 100).")


def parse(argv):
    args = _common.parse_repeated_comparison_args(
        argv,
        __doc__,
        add_setup_arguments,
        epochs=(3.0, 2.0),
        repeats=(2, 1),
        quick_help="Fewer images and epochs: about 1 minute.",
    )
    if args.train_per_class is None:
        args.train_per_class = 100 if args.quick else 250
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    from hf_finetune.config import VISION_TRAINING_DEFAULTS

    workers = args.workers if args.workers is not None else VISION_TRAINING_DEFAULTS["dataloader_num_workers"]
    per_class = {
        "train": args.train_per_class,
        "validation": max(10, args.train_per_class // 6),
        "test": max(20, args.train_per_class // 3),
    }
    classes = _common.PHOTOS[: args.classes]
    print(f"Throughput vs the docs-style peer on {_common.machine()}; {_common.load()}")

    ####################################
    # Data and checkpoint (cached)     #
    ####################################
    name = f"photos_{len(classes)}x{per_class['train']}-{per_class['validation']}-{per_class['test']}_640x480"
    data_dir = _common.make_photo_folder(_common.BENCH_OUT / name, per_class, classes=classes)
    files, size = _common.folder_bytes(data_dir)
    checkpoint = _common.build_checkpoint(
        _common.BENCH_OUT / f"tiny-{args.arch}-{args.image_size}", args.arch, args.image_size
    )
    _common.warm_page_cache(data_dir)
    n_train, n_test = per_class["train"] * len(classes), per_class["test"] * len(classes)
    print(
        f"  data: {data_dir} ({files} JPEGs, {size / files / 1024:.0f} KiB each on average; "
        f"{len(classes)} classes, train {n_train} / validation {per_class['validation'] * len(classes)} / "
        f"test {n_test})\n  checkpoint: tiny {args.arch} at {args.image_size} px ({checkpoint})\n"
        f"  {args.num_train_epochs:g} epochs, batch {args.batch_size}, lr {args.learning_rate:g}, "
        f"seed {args.seed}, {workers} dataloader worker(s) on both sides "
        f"({'--workers' if args.workers is not None else 'our default for this machine'})\n"
    )

    shared = [
        "--num_train_epochs", f"{args.num_train_epochs:g}",
        "--per_device_train_batch_size", str(args.batch_size),
        "--per_device_eval_batch_size", str(4 * args.batch_size),
        "--learning_rate", str(args.learning_rate),
        "--seed", str(args.seed),
    ]  # fmt: skip

    def command(side: str, output_dir: Path) -> list[str]:
        if side == "ours":
            cmd = [
                sys.executable, "-m", "hf_finetune.commands.cli", "train",
                "--model_name_or_path", str(checkpoint),
                "--train_dir", str(data_dir / "train"),
                "--validation_dir", str(data_dir / "validation"),
                "--test_dir", str(data_dir / "test"),
                "--output_dir", str(output_dir),
            ]  # fmt: skip
            return (
                cmd
                + shared
                + (["--dataloader_num_workers", str(workers)] if args.workers is not None else [])
            )
        return [
            sys.executable, __file__, PEER_COMMAND,
            "--data_dir", str(data_dir),
            "--model_name_or_path", str(checkpoint),
            "--output_dir", str(output_dir),
            "--dataloader_num_workers", str(workers),
        ] + shared  # fmt: skip

    ######################################
    # Runs, alternating which goes first #
    ######################################
    # Logs and outputs stay behind when a run fails or with --keep; otherwise they are removed.
    runs_dir = _common.BENCH_OUT / "throughput_vs_peer-runs"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    for repeat in range(args.repeats):
        for side in ("ours", "peer") if repeat % 2 == 0 else ("peer", "ours"):
            run_dir = runs_dir / f"{side}-{repeat}"
            print(f"  running {side} (log: {run_dir / 'log.txt'}) ...", flush=True)
            stats = _common.run_measured(
                command(side, run_dir / "output"),
                log=run_dir / "log.txt",
                env=_common.offline_env(datasets_cache=run_dir / "datasets-cache"),
            )
            _common.check_ok(stats, side)
            results = _common.read_results(run_dir / "output")
            runs[side].append(
                {
                    "train_runtime": results["train_runtime"],
                    "images_per_s": n_train * args.num_train_epochs / results["train_runtime"],
                    "test_accuracy": results["test_accuracy"],
                    "wall_s": stats.wall_s,
                    "cpu_s": stats.cpu_s,
                    "peak_rss": stats.peak_rss_bytes,
                }
            )
    if args.keep:
        print(f"  outputs and logs kept in {runs_dir}")
    else:
        shutil.rmtree(runs_dir)

    ####################################
    # Report                           #
    ####################################
    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    print(f"  done; {_common.load()}\n")
    rows = []
    for side, label in (
        ("ours", "ours (hf_finetune.commands.cli train)"),
        ("peer", "peer (HF docs tutorial)"),
    ):
        rows.append(
            [
                label,
                f"{median(side, 'train_runtime'):.1f} s",
                f"{median(side, 'images_per_s'):.1f}",
                f"{median(side, 'test_accuracy'):.3f}",
                f"{median(side, 'wall_s'):.1f} s",
                f"{median(side, 'cpu_s'):.1f} s",
                _common.mib(int(median(side, "peak_rss"))),
            ]
        )
    _common.print_table(
        ["", "train_runtime", "images/s", "test accuracy", "process wall", "process CPU", "peak RSS"], rows
    )
    ratio = median("ours", "images_per_s") / median("peer", "images_per_s")
    acc_ours, acc_peer = median("ours", "test_accuracy"), median("peer", "test_accuracy")
    noise = _common.accuracy_noise(acc_ours, acc_peer, n_test)
    print()
    print(f"throughput ratio ours/peer: {ratio:.2f}   (target >= 1.00)  {_common.verdict(ratio >= 1.0)}")
    print(
        f"test accuracy ours - peer: {acc_ours - acc_peer:+.3f}   (target >= -{noise:.3f}, two binomial "
        f"standard errors on {n_test} test images)  {_common.verdict(acc_ours - acc_peer >= -noise)}"
    )
    if args.repeats > 1:
        each = {side: [round(r["images_per_s"], 1) for r in runs[side]] for side in runs}
        print(f"({args.repeats} runs per side, medians shown; images/s of each run: {each})")
    print(
        "process wall and CPU cover the whole command (imports, data preparation, final evaluations); "
        "peak RSS is the largest single process."
    )


if __name__ == "__main__":
    if sys.argv[1:2] == [PEER_COMMAND]:
        peer_main(sys.argv[2:])
    else:
        main(sys.argv[1:])
