#!/usr/bin/env bash
# The GPU check of the step throughput targets (benchmarks/README.md): CIM step throughput of
# ViT-B/16 and ResNet-50 ResPix, bf16, batch 128, compiled, on one GPU, against the supervised step
# of the same stock timm model in the same run.
#
#   bash benchmarks/gpu_check.sh                       # JSON into ./results/
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # JSON into $OUT/
#
# Needs PyTorch with CUDA, timm and transformers already installed; installs nothing and needs no
# network (the tokenizer is the DALL-E architecture with random weights). The two required runs take
# about 4 minutes on an H100 including compilation. Targets (benchmarks/README.md): ViT-B CIM
# >= 1400 img/s and >= 0.45x supervised, ResNet-50 CIM >= 1700 img/s, ViT-B peak <= 14.2 GiB,
# the step's tokens (the tokenizer runs itself in fp16 on GPUs) equal to full-fp32 ones at >= 99 %.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # works without `pip install -e .`
export HF_HUB_OFFLINE=1
PYTHON="${PYTHON:-python}"
RESULTS="${OUT:-results}"
mkdir -p "$RESULTS"

"$PYTHON" - <<'EOF'
import sys

import torch

import cim_models  # noqa: F401  (from the repository root: PYTHONPATH)

if not torch.cuda.is_available():
    sys.exit("gpu_check.sh needs a CUDA GPU; torch.cuda.is_available() is False.")
print(f"cim_models from {cim_models.__path__[0]}; torch {torch.__version__}, "
      f"{torch.cuda.get_device_name()}")
EOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

COMMON=(--objective respix --precision bf16 --batch-size 128 --compile --steps 30 --warmup 4
        --breakdown-steps 10 --device cuda)

FAILED=()
run() {  # run NAME ARGS...: one benchmark process, its table on stdout, its JSON in $RESULTS
  local name="$1"
  shift
  echo "== $name"
  local start=$SECONDS
  if ! "$PYTHON" benchmarks/step_throughput.py "${COMMON[@]}" "$@" --json "$RESULTS/$name.json"
  then
    FAILED+=("$name")  # go on with the next run; the script fails at the end
  fi
  echo "== $name took $((SECONDS - start)) s"
}

run vit_base_respix_bf16_b128_compiled --preset vit_base --check-tokens 256
run resnet50_respix_bf16_b128_compiled_cl --preset resnet50 --channels-last

"$PYTHON" - "$RESULTS" <<'EOF'
import json
import sys
from pathlib import Path

targets = {"vit_base": (1400, 0.45, 14.2), "resnet50": (1700, None, None)}
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    preset = r["config"]["preset"]
    if preset not in targets:
        continue
    min_ips, min_ratio, max_gib = targets[preset]
    cim = r["cim"]
    checks = [f"{cim['images_per_s']:.0f} img/s (>= {min_ips}: {cim['images_per_s'] >= min_ips})"]
    if min_ratio:
        checks.append(f"ratio {r['ratio']:.3f}x (>= {min_ratio}: {r['ratio'] >= min_ratio})")
    if max_gib:
        gib = cim["peak_memory_gib"]
        checks.append(f"peak {gib:.1f} GiB (<= {max_gib}: {gib <= max_gib})")
    if "token_agreement" in r:
        checks.append(f"fp16 tokens vs fp32 {100 * r['token_agreement']:.2f} % (>= 99: "
                      f"{r['token_agreement'] >= 0.99})")
    print(f"{path.stem}: " + "; ".join(checks))
EOF

if ((${#FAILED[@]})); then
  echo "failed: ${FAILED[*]}" >&2
  exit 1
fi
