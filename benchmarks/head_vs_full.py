"""Head-only against full fine-tuning: time and peak memory of one training step, side by side.

    .venv/bin/python benchmarks/head_vs_full.py           # about 1 minute on 2 CPU cores
    .venv/bin/python benchmarks/head_vs_full.py --quick   # about 20 seconds

Target: a `head` step takes at most 0.5 x the time of a `full` step, and its peak memory is lower. Printed
with PASS/MISS, never asserted.

What is compared: one model per strategy, frozen by `hf_finetune.strategies.plan.prepare_strategy` exactly as a
run freezes it (requires_grad, BatchNorm hooks) and optimised by AdamW over the strategy's own parameter
groups (`FreezingPlan.param_groups`, what the Trainer gets). A step is forward + cross-entropy + backward +
AdamW step + zero_grad on one fixed batch in train mode; data loading is left out, so the figure is the
model's cost alone.

Timing: after warm-up steps, rounds alternate the order (full then head, head then full, ...), each side
running a few steps per round; the reported figure is the median per-step time over rounds, and the ratio
is median(head) / median(full). Memory: `torch.profiler` with profile_memory + record_shapes + with_stack
over one step, then its memory timeline (`export_memory_timeline`, raw JSON): the peak over the step of the
bytes of all live tensors on the CPU (parameters, optimizer state, inputs, activations kept for backward,
gradients, temporaries), with the breakdown at that peak.

Configs: `quickstart` is the model recipes/quickstart.yaml trains (the tiny ViT of hf_finetune.testing.tiny: hidden
32, 2 layers, 32 px, batch 64). At that size a step is dominated by per-operator overhead rather than
arithmetic, so the same comparison is also run on `bigger` (hidden 192, 6 layers, 3 heads, 64 px in 8 px
patches, batch 32; ViT-Tiny's width at a CPU-friendly depth and resolution). Both are always printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CONFIGS = {
    "quickstart": {"batch": 64, "overrides": {}},
    "bigger": {
        "batch": 32,
        "overrides": {
            "hidden_size": 192,
            "num_hidden_layers": 6,
            "num_attention_heads": 3,
            "intermediate_size": 768,
            "image_size": 64,
            "patch_size": 8,
        },
    },
}
LABELS = [f"digit_{i}" for i in range(10)]
TARGET_RATIO = 0.5


def build(config_name: str, strategy: str):
    """A model of `config_name` frozen for `strategy`, its AdamW, and one (pixels, labels) batch."""
    import torch
    from transformers import AutoModelForImageClassification, Trainer

    from hf_finetune.strategies.arguments import StrategyArguments
    from hf_finetune.strategies.param_groups import GroupSettings, param_groups
    from hf_finetune.strategies.plan import prepare_strategy
    from hf_finetune.testing.tiny import tiny_config

    spec = CONFIGS[config_name]
    config = tiny_config("vit", LABELS)
    for key, value in spec["overrides"].items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(config).train()
    generator = torch.Generator().manual_seed(0)
    size = config.image_size
    pixels = torch.randn(spec["batch"], 3, size, size, generator=generator)
    labels = torch.randint(0, len(LABELS), (spec["batch"],), generator=generator)
    plan = prepare_strategy(
        model, StrategyArguments(strategy=strategy), example_inputs={"pixel_values": pixels}
    )
    decay = Trainer.get_decay_parameter_names(None, model)  # the Trainer's own weight-decay split
    groups = param_groups(plan, model, plan.trainable_at(0), GroupSettings(1e-3, 0.05, frozenset(decay)))
    optimizer = torch.optim.AdamW(groups)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return model, optimizer, pixels, labels, trainable, total


def make_step(model, optimizer, pixels, labels):
    import torch.nn.functional as F

    def step():
        loss = F.cross_entropy(model(pixel_values=pixels).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peak_memory(step) -> tuple[int, dict[str, int]]:
    """Peak bytes of live CPU tensors during one `step`, and the breakdown by category at that peak."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import _CATEGORY_TO_INDEX

        names = ["unknown"] + [c.name.lower() if c else "unknown" for c in _CATEGORY_TO_INDEX]
    except ImportError:  # the breakdown's labels are private; the total is not
        names = None
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", FutureWarning
        )  # deprecated for CUDA snapshots; the CPU timeline remains
        path = Path(tmp) / "timeline.raw.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    peak_row = max(sizes, key=sum)
    breakdown = {}
    if names and len(names) == len(peak_row):
        breakdown = {name: size for name, size in zip(names, peak_row, strict=True) if size}
    return sum(peak_row), breakdown


def measure(config_name: str, rounds: int, steps: int, warmup: int) -> dict[str, dict]:
    sides = {}
    for strategy in ("full", "head"):
        model, optimizer, pixels, labels, trainable, total = build(config_name, strategy)
        step = make_step(model, optimizer, pixels, labels)
        for _ in range(warmup):  # also creates AdamW's state, so memory is measured in the steady state
            step()
        sides[strategy] = {"step": step, "times": [], "trainable": trainable, "total": total}
    order = ["full", "head"]
    for round_index in range(rounds):
        for strategy in order if round_index % 2 == 0 else order[::-1]:
            side = sides[strategy]
            start = time.perf_counter()
            for _ in range(steps):
                side["step"]()
            side["times"].append((time.perf_counter() - start) / steps)
    for side in sides.values():
        side["median"] = statistics.median(side["times"])
        side["peak"], side["breakdown"] = peak_memory(side["step"])
    return sides


def report(config_name: str, sides: dict) -> bool:
    full, head = sides["full"], sides["head"]
    ratio = head["median"] / full["median"]
    memory_ratio = head["peak"] / full["peak"]
    batch = CONFIGS[config_name]["batch"]
    spread = {k: f"{min(v['times']) * 1e3:.2f}..{max(v['times']) * 1e3:.2f}" for k, v in sides.items()}
    rows = [
        ("", "full", "head", "head / full"),
        ("trainable parameters", f"{full['trainable']:,}", f"{head['trainable']:,}",
         f"{head['trainable'] / full['trainable']:.4f}"),
        ("median step time", f"{full['median'] * 1e3:.2f} ms", f"{head['median'] * 1e3:.2f} ms", f"{ratio:.3f}"),
        ("  min..max over rounds, ms", spread["full"], spread["head"], ""),
        ("images / s", f"{batch / full['median']:,.0f}", f"{batch / head['median']:,.0f}", f"{1 / ratio:.2f}x"),
        ("peak tensor memory", mib(full["peak"]), mib(head["peak"]), f"{memory_ratio:.3f}"),
    ]  # fmt: skip
    for category in sorted(set(full["breakdown"]) | set(head["breakdown"])):
        sizes = [sides[s]["breakdown"].get(category, 0) for s in ("full", "head")]
        if max(sizes) >= 2**10:  # leave out categories under 1 KiB on both sides
            rows.append((f"  at peak: {category}", mib(sizes[0]), mib(sizes[1]), ""))
    print(f"\n== {config_name} (batch {batch}, {full['total']:,} parameters) ==")
    for label, a, b, c in rows:
        print(f"{label:28}{a:>18}{b:>18}{c:>14}")
    time_ok, memory_ok = ratio <= TARGET_RATIO, memory_ratio < 1.0
    print(
        f"target step time head <= {TARGET_RATIO} x full: {'PASS' if time_ok else 'MISS'} ({ratio:.3f}); "
        f"peak memory head < full: {'PASS' if memory_ok else 'MISS'} ({memory_ratio:.3f})"
    )
    return time_ok and memory_ok


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    # One thread by default: these models are too small to split, and on a shared machine OpenMP's spinning
    # worker threads turn small matmuls into waits, which would measure the neighbours rather than the model.
    torch.set_num_threads(args.threads)
    rounds, steps = (3, 3) if args.quick else (9, 5)
    print(
        f"head vs full, one training step (forward + backward + AdamW), torch {torch.__version__}, "
        f"{args.threads} thread(s), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
        f"{rounds} interleaved rounds"
    )
    results = {}
    for config_name in CONFIGS:
        per_round = steps if config_name == "quickstart" else max(1, steps // 2)
        results[config_name] = report(config_name, measure(config_name, rounds, per_round, warmup=3))
    print(
        "\nSummary: "
        + "; ".join(
            f"{name}: {'meets both targets' if ok else 'MISSES a target'}" for name, ok in results.items()
        )
        + "."
    )


if __name__ == "__main__":
    main()
