#!/usr/bin/env bash
# One prepared GPU check: ViT-B/16 and EfficientNet-Lite0 at 224 px, bf16, ours vs the docs-style peer, images/s and MFU, on one
# H100/H200, in under 5 minutes. Needs torch, transformers, accelerate, datasets and torchvision already
# installed; no network (the checkpoint and the JPEGs are made locally). Run from anywhere:
#
#   bash benchmarks/gpu.sh                      # the GPU run (extra arguments go to gpu_bench.py)
#   bash benchmarks/gpu.sh --dry-run            # CPU, tiny sizes, 2 steps: checks the script end to end
#   PYTHON=.venv/bin/python bash benchmarks/gpu.sh --peak_tflops 989
#
# The figures are printed and written as JSON to $OUT/gpu_bench.json when $OUT is set (else bench_out/).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-270}  # seconds for gpu_bench.py; with the checks above, under 5 minutes in all
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# Editable install without dependencies (there is no network); the runs import hf_finetune from the source
# tree anyway (they start in the repository root), so a failure here is only reported.
# --no-index and --no-build-isolation: no attempt to reach a package index, which would only time out.
"$PYTHON" -m pip install -e . --no-deps --no-index --no-build-isolation --quiet --disable-pip-version-check \
  || echo "gpu.sh: 'pip install -e . --no-deps' failed; running from the source tree" >&2

missing=$("$PYTHON" - <<'PY'
import importlib.util
need = ["torch", "transformers", "accelerate", "datasets", "torchvision", "timm", "PIL", "numpy", "yaml", "safetensors"]
print(" ".join(name for name in need if importlib.util.find_spec(name) is None))
PY
)
if [ -n "$missing" ]; then
  echo "gpu.sh: missing Python packages: $missing (install them from a local wheel folder first)" >&2
  exit 3
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null || true
df -h /dev/shm 2>/dev/null || true  # 12 workers pass 77 MB batches through shared memory

json_args=()
if [ -n "${OUT:-}" ]; then
  json_args=(--json "$OUT/gpu_bench.json")
fi
timeout --kill-after=10 "$((BUDGET_S + 15))" "$PYTHON" benchmarks/gpu_bench.py --budget_s "$BUDGET_S" "${json_args[@]}" "$@"
status=$?
[ "$status" -eq 124 ] && echo "gpu.sh: gpu_bench.py passed its ${BUDGET_S} s budget and was stopped" >&2
echo "gpu.sh: exit status $status after ${SECONDS} s"
exit "$status"
