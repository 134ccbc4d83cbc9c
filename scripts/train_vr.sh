#!/usr/bin/env bash
# Train the variable-rate model across sessions (docs/codec.md, docs/results.md): since
# msh-vr2 the run is the wide one (M=192, widened from msh-vr2 at its start; the M=96 run's
# resume point training/msh-vr.ckpt at step 51,000 is in git history at 76d2946).
#
#   ./scripts/train_vr.sh            # resume the main run from training/msh-vrw.ckpt (one core,
#                                    # nice; stop it any time: it checkpoints every 250 steps)
#   ./scripts/train_vr.sh main ARGS  # the same with more jobs.train flags (the wide run was resumed
#                                    # once with --revive-dead-channels, at step 17,750)
#   ./scripts/train_vr.sh branch ID  # a decay branch of the resume point as it is now (1500
#                                    # steps at lr / 10, in runs/cool/; the main run may go on),
#                                    # then 3000 steps of g_s alone on rounded latents, exported
#                                    # as model ID into codec/weights, then the weights re-packed
#                                    # (codec.weight_store)
#   ./scripts/train_vr.sh finish ID  # end of a session: stop the main run, branch, compact
#   ./scripts/train_vr.sh compact    # end of a session without an export: stop, compact
#                                    # (float16 weights, no Adam moments: codec.train)
#
# ID must be new (msh-vr2, msh-vr3, ...): a shipped id names its weights for good, since a
# stream names only its model id and decodes with that exact file (docs/bitstream.md).
#
# Since wide step 55,750 every crop's rate is drawn from the whole grid (--rate-grid), not
# only from the 9 trained λ: msh-vr3, trained on those only, codes badly between them (it is
# limited to them: rate_step 32 in the registry; docs/codec.md).
#
# Since wide step 122,500 each crop's loss is weighted by (λ_r/λ_0)^-0.6 (--rate-weight-power):
# unweighted, the top rates' larger losses drowned the low end's gradient, and the zoo's
# lowest level beat the variable-rate model there (docs/results.md, "Low-rate weighting").
#
# The main run keeps a constant learning rate (warmup-stable-decay: the stable phase goes on
# from session to session); only the exported weights get the decay, on a branch, so the
# resume point stays a stable-phase state. Commit training/ and codec/weights/ afterwards.
#
# The stable rate is 1e-4 since wide step 163,000 (LR=... overrides): at 2e-4 the run had
# plateaued, 0.4% better in 29,000 steps after msh-vr5's branch point on the held-out train
# crops (bench/compare_checkpoints.py: +2.6% -> +2.2% against decayed msh-vr5).
#
# Since wide step 177,000 h_s is msh-vr5's, fixed (--hyper-synthesis-of): an export then
# shares it with msh-vr5's file, and only so does it fit the 40 MB of shipped weights
# (h_s is 2.7 M of the model's 4.1 M parameters). The transplant cost 5% on the held-out
# crops at first (-1.7% -> +3.3% against msh-vr5); the rest of the model adapts to it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || ./scripts/setup.sh
export OMP_NUM_THREADS="${TRAIN_THREADS:-1}"  # 2 when the machine is otherwise idle
CKPT=training/msh-vrw.ckpt
DECAY_STEPS="${DECAY_STEPS:-1500}"
COOLDOWN="${COOLDOWN:-step}"  # the decay's shape (jobs.train --lr-cooldown): step = lr / 10
SYNTHESIS_STEPS="${SYNTHESIS_STEPS:-3000}"  # then g_s alone on rounded latents (--fine-tune)
TRAIN=(.venv/bin/python -m jobs.train --data ../shared/data/bsds500/train
       --data ../shared/data/wikipedia-photos/train --lmbdas default --N 64 --M 192
       --crop 128 --batch-size 8 --lr "${LR:-1e-4}" --checkpoint-every 250 --rate-grid
       --rate-weight-power "${RATE_WEIGHT_POWER:-0.6}" --hyper-synthesis-of msh-vr5 --quiet)

stop_main() { pkill -f -- "--checkpoint $CKPT" && sleep 3 || true; }
compact() {
  .venv/bin/python -c "from pathlib import Path; from codec.train import compact_checkpoint; compact_checkpoint(Path('$CKPT'))"
}

case "${1:-main}" in
  main)
    exec nice -n 10 "${TRAIN[@]}" --checkpoint "$CKPT" --init-from msh-vr6 \
      --lr-drop-at 1.0 --steps 100000000 "${@:2}" ;;
  branch|finish)
    id="${2:?usage: $0 $1 NEW_MODEL_ID (a shipped id is never reused)}"
    if grep -q "\"id\": \"$id\"" codec/weights/registry.json; then
      echo "model id $id is shipped already; streams name it, so its weights stay: pick a new id" >&2
      exit 2
    fi
    if [ "$1" = finish ]; then stop_main; fi
    mkdir -p runs/cool
    cp "$CKPT" runs/cool/vr.ckpt  # checkpoints are written whole (tmp + rename), moments and all
    step=$(.venv/bin/python -c "import torch; print(torch.load('runs/cool/vr.ckpt', weights_only=True)['step'])")
    total=$((step + DECAY_STEPS))
    drop=$(.venv/bin/python -c "print($step / $total - 1e-9)")
    nice -n 5 "${TRAIN[@]}" --checkpoint runs/cool/vr.ckpt --steps "$total" --lr-drop-at "$drop" \
      --lr-cooldown "$COOLDOWN"
    # then g_s alone on the latents as coding rounds them (--fine-tune synthesis; -0.6% on
    # the held-out train crops, docs/results.md), exported from there
    rm -f runs/cool/synthesis.ckpt
    nice -n 5 "${TRAIN[@]}" --checkpoint runs/cool/synthesis.ckpt --init-from runs/cool/vr.ckpt \
      --fine-tune synthesis --steps "$SYNTHESIS_STEPS" --lr-drop-at 0.8 \
      --export "$id" --export-data "bsds500/train + wikipedia-photos/train" \
      --note "variable-rate (gain units, 9 λ 0.0009·2^k), N=64 M=192 widened from msh-vr2 (M=96, 66,500 steps; codec.variable_rate.widen), its 95 unused new channels split from live ones at wide step 17,750 (--revive-dead-channels), rates drawn from the whole grid since wide step 55,750 (--rate-grid), loss weighted (λ_r/λ_0)^-${RATE_WEIGHT_POWER:-0.6} since wide step 122,500 (--rate-weight-power): $step wide steps at lr 2e-4 (${LR:-1e-4} from wide step 163,000; gains 10x), then a $DECAY_STEPS-step decay (--lr-cooldown $COOLDOWN), then $SYNTHESIS_STEPS steps of g_s alone on the rounded latents (--fine-tune synthesis, the last 20% at lr / 10); h_s fixed to msh-vr5's since wide step 177,000 (--hyper-synthesis-of); batch 8 of 128px crops, CPU; resume point $CKPT (before the decay)"
    # Store the tensors it shares with the shipped files once (codec.weight_store; it says
    # so if they are over the 40 MB). Once the eval shows the new model better, retire the
    # default's encoder; the default mark moves to the new model:
    #   python -m codec.weight_store --retire msh-vr6=ID
    .venv/bin/python -m codec.weight_store || true
    if [ "$1" = finish ]; then compact; fi
    ;;
  compact)  # end of a session: stop the main run, compact its resume point for the commit
    stop_main; compact ;;
  *) echo "usage: $0 [main | branch NEW_MODEL_ID | finish NEW_MODEL_ID | compact]" >&2; exit 2 ;;
esac
