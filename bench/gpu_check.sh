#!/usr/bin/env bash
# GPU check (issue 21, part 4), sized for under 8 minutes on one H100/H200:
#   1. the CUDA-marked tests (bf16 training, NCCL on one GPU at ZeRO 0 and 3, bf16 vs fp32 embeddings);
#   2. training throughput against OpenCLIP's trainer at ViT-B/32 size (224 px, patch 32, width 768,
#      12 layers, context 77), batch 256, bf16 on both (OpenCLIP: amp_bf16), 30 steps, one repeat;
#   3. embedding throughput of the trained tiny model through `mmpt embed` on the GPU.
# Results: bench/results/gpu_*.json. Nothing here has run on CUDA yet (no GPU lent so far).
#
#   bench/gpu_check.sh            # on a machine with a CUDA GPU, from the repository root
#   bench/gpu_check.sh --dry-run  # anywhere: check every step's arguments, run nothing (the test suite does this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
mkdir -p bench/results

if [ "$DRY" = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device visible to $PY; run on a GPU machine, or --dry-run" >&2
  exit 2
fi

echo "== 1/3 CUDA tests"
if [ "$DRY" = 1 ]; then
  "$PY" -m pytest -q -m cuda --collect-only tests/test_cuda.py > /dev/null
else
  "$PY" -m pytest -q -m cuda tests/test_cuda.py --junitxml bench/results/gpu_tests.xml
  "$PY" - <<'PY'
import json, xml.etree.ElementTree as ET, torch
s = ET.parse("bench/results/gpu_tests.xml").getroot().find("testsuite") or ET.parse("bench/results/gpu_tests.xml").getroot()
out = {k: s.get(k) for k in ("tests", "failures", "errors", "skipped", "time")}
out["device"] = torch.cuda.get_device_name(0)
json.dump(out, open("bench/results/gpu_tests.json", "w"), indent=1)
print(out)
PY
fi

echo "== 2/3 training throughput, ViT-B/32 size, bf16, batch 256"
TRAIN=(bench/train_throughput.py --device cuda --precision bf16 --image-size 224 --patch 32 --width 768 --layers 12
       --heads 12 --ctx 77 --embed-dim 512 --batch-size 256 --steps 30 --repeats 1 --configs 77:web --workers 8
       --threads 8 --out bench/results/gpu_train_throughput.json)
if [ "$DRY" = 1 ]; then "$PY" "${TRAIN[@]}" --dry-run; else "$PY" "${TRAIN[@]}"; fi

echo "== 3/3 embedding throughput (mmpt embed on the GPU, bf16 auto)"
if [ "$DRY" = 1 ]; then
  "$PY" -m mmpt embed --help > /dev/null
else
  WORK=$(mktemp -d)
  "$PY" -m mmpt data demo --out "$WORK/data" --train-samples 2000 --eval-samples 4000
  "$PY" -m mmpt train clip-tiny --set "data.sources=[$WORK/data/train]" --set train.steps=20 \
    --set "train.out_dir=$WORK/run" --set 'eval=[]' --set train.progress=false
  "$PY" -m mmpt export "$WORK/run" --out "$WORK/m.safetensors"
  "$PY" -m mmpt embed "$WORK/m.safetensors" --data "$WORK/data/eval" --modality image --out "$WORK/emb" \
    --batch-size 256 --precision auto | tee "$WORK/embed.log"
  "$PY" - "$WORK/embed.log" <<'PY'
import json, re, sys, torch
line = open(sys.argv[1]).read()
m = re.search(r"embedded (\d+) samples .* in ([\d.]+) s \(([\d.]+) samples/s\)", line)
json.dump({"device": torch.cuda.get_device_name(0), "samples": int(m[1]), "seconds": float(m[2]),
           "samples_per_s": float(m[3])}, open("bench/results/gpu_embed_throughput.json", "w"), indent=1)
PY
  rm -rf "$WORK"
fi
echo "gpu_check: done$([ "$DRY" = 1 ] && echo ' (dry run: arguments checked, nothing run)')"
