#!/usr/bin/env bash
# Every GPU measurement of the benchmarks in one call, in about 10 minutes on one GPU:
#   bash benchmarks/gpu_all.sh [OUT_DIR]     (default benchmarks/results/gpu)
# 1. ms_deform_attn fwd+bwd at encoder and decoder sizes (R50 800x1088): the Triton kernel
#    (compiled on first use), the pure PyTorch paths, the default and HF, fp32 inputs;
# 2. the real R50 training step at 800x1088 (matcher, criterion, AdamW) against HF's, fp32
#    and bf16 autocast, interleaved rounds, CUDA events, peak memory;
#    with the step's FLOPs and MFU (FlopCounterMode; H100/H200 peaks built in);
# 3. the loader presets (CPU side) on the same machine, with 4 workers;
# 4. stage 1: ResNet-50 training img/s per GPU fed by the loader, decoding on the CPU vs on the
#    GPU (nvJPEG, data.decode_on: device), bf16, channels_last;
# 5. how step time and memory of the R50 detector grow with image side and queries (bf16), and
#    with two GPUs, per-rank memory under ZeRO 0-3 for the real detector.
# Each part has its own time limit, so one slow part cannot eat the others' time.
set -u
OUT=${1:-benchmarks/results/gpu}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1
run() {  # run <limit_s> <name> <command...>
  local limit=$1 name=$2; shift 2
  local begin=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - begin)) s" | tee -a "$OUT/summary.txt"
}
run 150 attn_fp32 "$PY" benchmarks/detr_step.py --out "$OUT/attn_fp32" --config r50 \
  --device cuda --dtype fp32 --skip-model --warmup 3 --steps 10 --rounds 3
run 120 step_fp32 "$PY" benchmarks/detr_step.py --out "$OUT/step_fp32" --config r50 \
  --device cuda --dtype fp32 --skip-attention --warmup 3 --steps 8 --rounds 3
run 120 step_bf16 "$PY" benchmarks/detr_step.py --out "$OUT/step_bf16" --config r50 \
  --device cuda --dtype bf16 --skip-attention --warmup 3 --steps 8 --rounds 3
run 45 loader_imagenet "$PY" benchmarks/data_loader.py --preset imagenet --out "$OUT" \
  --images 256 --rounds 2 --workers 4
run 45 loader_coco "$PY" benchmarks/data_loader.py --preset coco --out "$OUT" \
  --images 96 --rounds 2 --workers 4
run 100 stage1_throughput "$PY" benchmarks/stage1_throughput.py --out "$OUT" \
  --device cuda --model resnet50 --image-size 224 --batch-size 128 --images 512 \
  --workers 8 --warmup 8 --steps 30
run 150 cost_growth_bf16 "$PY" benchmarks/cost_growth.py --out "$OUT/cost_growth_bf16" \
  --device cuda --dtype bf16 --steps 3
# per-rank ZeRO memory of the real detector needs two GPUs (one rank per GPU under NCCL)
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  run 300 zero_detector "$PY" benchmarks/zero_memory.py --out "$OUT/zero_detector" --model detector \
    --height 800 --width 1067 --batch 2 --steps 3
fi
cat "$OUT/summary.txt"
