#!/usr/bin/env bash
# One GPU session, prepared: fine-tune the variable-rate model on the lent GPU, evaluate it,
# and run the codec's GPU checks, all in one call of the device tool (docs/gpu.md).
#
#   ./scripts/gpu_session.sh prepare     # here, first: build .gpu/ (training pack, wheels)
#   # then one call of the device tool, from the repository root:
#   #   run(command="./scripts/gpu_session.sh", carry=[".gpu"], timeout_s=600)
#   ./scripts/gpu_session.sh import DIR  # here, after: register the weights it brought back
#                                        # (add --retire msh-vr6=msh-vr-gpu1 when it beats msh-vr6)
#   ./scripts/gpu_session.sh --smoke     # here, on the CPU: the same steps, tiny
#
# On the device the steps fit its 15-minute budget: ~4-5 minutes of training (TRAIN_SECONDS,
# bf16 autocast, channels_last, crops on the GPU; the whole model, then g_s alone on rounded
# latents for the last fifth, each phase ending at lr / 10), then a val
# evaluation of the new weights and the checks (~2 minutes). What comes back in $OUT
# (at most 8 files): weights/$GPU_MODEL.pt.xz, weights/registry.json, train.log.jsonl,
# eval.json, checks.json, session.log. BASE_MODEL (default msh-vr6) is fine-tuned into
# GPU_MODEL (default msh-vr-gpu1), a new id: a shipped id names its weights for good. Its
# h_s stays BASE_MODEL's (--hyper-synthesis-of), so the two files share it: a model with
# its own h_s would not fit the 40 MB of shipped weights (docs/codec.md).
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-device}"
case "$mode" in
  prepare)
    [ -x .venv/bin/python ] || ./scripts/setup.sh
    exec .venv/bin/python scripts/gpu_session.py pack ;;
  import)
    [ -n "${2:-}" ] || { echo "usage: $0 import DIR (the session's weights folder)" >&2; exit 2; }
    exec .venv/bin/python scripts/gpu_session.py import "${@:2}" ;;
  --smoke)
    [ -x .venv/bin/python ] || ./scripts/setup.sh
    PY=.venv/bin/python
    OUT="${OUT:-runs/gpu-smoke}"
    TRAIN_SECONDS="${TRAIN_SECONDS:-20}"
    DEVICE=cpu
    BATCH=2 CROP=64 IMAGES=2 BATCHES=1 SGA_IT=2 EVAL_LIMIT=2 CROSS_IT=3 PIPE_IT=3
    [ -d .gpu/train ] || { echo "no .gpu/ pack: run '$0 prepare' first" >&2; exit 2; } ;;
  device)
    PY=python3
    OUT="${OUT:?the device tool sets OUT}"
    TRAIN_SECONDS="${TRAIN_SECONDS:-240}"
    DEVICE=cuda
    BATCH=16 CROP=256 IMAGES=20 BATCHES=8,16 SGA_IT=20 EVAL_LIMIT=20 CROSS_IT=50 PIPE_IT=500
    # the device's image lacks constriction (and Ray): install the carried wheels
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .gpu/wheels/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
    nvidia-smi -L ;;
  *) echo "usage: $0 [prepare | import DIR | --smoke]" >&2; exit 2 ;;
esac

export PYTHONUNBUFFERED=1
BASE_MODEL="${BASE_MODEL:-msh-vr6}"
GPU_MODEL="${GPU_MODEL:-msh-vr-gpu1}"
mkdir -p "$OUT/weights"
WORK="$(mktemp -d)"
exec > >(tee "$OUT/session.log") 2>&1
echo "gpu session ($mode) on $DEVICE, training ${TRAIN_SECONDS}s, $(date -u +%FT%TZ)"

# 1. Fine-tune the shipped variable-rate model, time-boxed: all of it (its h_s stays
#    BASE_MODEL's), then, for the last fifth of the time, g_s alone on the latents as coding
#    rounds them (--fine-tune synthesis: -0.6% on the CPU, docs/results.md); exported.
SYNTH_SECONDS=$((TRAIN_SECONDS / 5))
COMMON=(--data .gpu/train --lmbdas default --N 64 --M 192 --crop "$CROP" --batch-size "$BATCH"
        --lr 1e-4 --steps 100000000 --bf16 --log-every 50 --checkpoint-every 1000000 --rate-grid
        --rate-weight-power 0.6 --hyper-synthesis-of "$BASE_MODEL" --quiet)
"$PY" -m jobs.train "${COMMON[@]}" --checkpoint "$WORK/vr.ckpt" --init-from "$BASE_MODEL" \
  --lr-drop-at 0.85 --time-budget "$((TRAIN_SECONDS - SYNTH_SECONDS))"
"$PY" -m jobs.train "${COMMON[@]}" --checkpoint "$WORK/synthesis.ckpt" \
  --init-from "$WORK/vr.ckpt" --fine-tune synthesis --lr-drop-at 0.8 \
  --time-budget "$SYNTH_SECONDS" --export "$GPU_MODEL" --registry "$OUT/weights/registry.json" \
  --export-data "bsds500/train + wikipedia-photos/train (GPU pack, 256px crops)" \
  --note "fine-tuned on a GPU for ${TRAIN_SECONDS}s from the shipped $BASE_MODEL, the last ${SYNTH_SECONDS}s g_s alone on rounded latents (scripts/gpu_session.sh)"
cat "$WORK/vr.log.jsonl" "$WORK/synthesis.log.jsonl" > "$OUT/train.log.jsonl"

# 2. The new weights on val images (sgarc curves only; the classical ones run here, later).
"$PY" -m jobs.evaluate .gpu/val --limit "$EVAL_LIMIT" --model "$GPU_MODEL" \
  --registry "$OUT/weights/registry.json" --baselines none --device "$DEVICE" --quiet \
  --json "$OUT/eval.json"

# 3. The codec's GPU checks: cross-device decoding, SGA throughput, a pipeline shard.
"$PY" scripts/gpu_session.py checks --registry "$OUT/weights/registry.json" \
  --model "$GPU_MODEL" --pipeline-model "$BASE_MODEL" --device "$DEVICE" \
  --images "$IMAGES" --batches "$BATCHES" --sga-iterations "$SGA_IT" \
  --cross-iterations "$CROSS_IT" --pipeline-iterations "$PIPE_IT" --out "$OUT" --work "$WORK"
rm -rf "$WORK"
echo "done: $(ls "$OUT" "$OUT/weights" | tr '\n' ' ')"
