#!/usr/bin/env bash
# Every GPU measurement of the benchmarks in one call, within BUDGET_S seconds on one GPU:
#   bash benchmarks/gpu_all.sh [OUT_DIR]     (default benchmarks/results/gpu; BUDGET_S=540)
# In order of value, so that a short lease still gets the first ones:
# 1. the gpu-marked tests of the fused Triton ms_deform_attn kernel (values and gradients) and of
#    the detectors and segmenter on CUDA (outputs as on the CPU, no sync in the forward);
# 2. ms_deform_attn fwd+bwd at encoder and decoder sizes (R50 800x1088): the Triton kernel
#    (compiled on first use), the pure PyTorch paths, the default and HF; fp32 and bf16 inputs;
# 3. the real R50 training step at 800x1088 (matcher, criterion, AdamW) against HF's, bf16
#    autocast then fp32: ours (the Triton kernel) and ours with pure PyTorch attention, interleaved
#    rounds, CUDA events, peak memory, the step's FLOPs and MFU (H100/H200 peaks built in);
# 4. stage 1: ResNet-50 training img/s per GPU fed by the loader, decoding on the CPU vs on the
#    GPU (nvJPEG, data.decode_on: device), bf16, channels_last;
# 5. how step time and memory of the R50 detector grow with image side and queries (bf16);
# 6. the loader presets (CPU side) with 4 workers; with two GPUs, per-rank memory under
#    ZeRO 0-3 for the real detector.
# Each part has its own time limit and is skipped when the budget left is below it, so one slow
# part cannot eat the others' time; summary.txt says what ran, how it ended and how long it took.
set -u
OUT=${1:-benchmarks/results/gpu}
PY=${PYTHON:-.venv/bin/python}
BUDGET_S=${BUDGET_S:-540}
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_all.sh: $PY sees no CUDA device; on a CPU run 'make bench' (or set PYTHON)" >&2
  exit 2
fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1
"$PY" -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision',
torchvision.__version__, 'timm', timm.__version__)" >> "$OUT/device.csv" 2>&1
run() {  # run <limit_s> <name> <command...>
  local limit=$1 name=$2; shift 2
  if [ $((BUDGET_S - SECONDS)) -lt "$limit" ]; then
    echo "$name: skipped, $((BUDGET_S - SECONDS)) s of the budget left" | tee -a "$OUT/summary.txt"
    return
  fi
  local begin=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - begin)) s" | tee -a "$OUT/summary.txt"
}
run 90 gpu_tests "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/unit/test_ms_deform_attn.py \
  tests/gpu/test_models_gpu.py
run 90 attn "$PY" benchmarks/detr_step.py --out "$OUT/attn" --config r50 --device cuda \
  --skip-model --attn-dtypes fp32,bf16 --warmup 3 --steps 10 --rounds 3
run 100 step_bf16 "$PY" benchmarks/detr_step.py --out "$OUT/step_bf16" --config r50 \
  --device cuda --dtype bf16 --skip-attention --warmup 3 --steps 8 --rounds 3 --profile 3
run 80 stage1_throughput "$PY" benchmarks/stage1_throughput.py --out "$OUT/stage1" \
  --device cuda --model resnet50 --image-size 224 --batch-size 128 --images 512 \
  --workers 8 --warmup 8 --steps 30
run 90 step_fp32 "$PY" benchmarks/detr_step.py --out "$OUT/step_fp32" --config r50 \
  --device cuda --dtype fp32 --skip-attention --warmup 3 --steps 8 --rounds 3
run 110 cost_growth_bf16 "$PY" benchmarks/cost_growth.py --out "$OUT/cost_growth_bf16" \
  --device cuda --dtype bf16 --steps 3 --point-timeout 60
run 45 loader_imagenet "$PY" benchmarks/data_loader.py --preset imagenet --out "$OUT/loader" \
  --images 256 --rounds 2 --workers 4
# per-rank ZeRO memory of the real detector needs two GPUs (one rank per GPU under NCCL)
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  run 300 zero_detector "$PY" benchmarks/zero_memory.py --out "$OUT/zero_detector" --model detector \
    --height 800 --width 1067 --batch 2 --steps 3
fi
cat "$OUT/summary.txt"
