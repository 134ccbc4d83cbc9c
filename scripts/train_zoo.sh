#!/usr/bin/env bash
# Reproduce the shipped model zoo (msh-small-q1 … q6) from msh-small-q4.
#
# msh-small-q4 was trained from scratch (docs/codec.md gives its command). Every other
# quality is fine-tuned from its neighbour's checkpoint, λ one step further each time
# (CompressAI's λ ladder): two chains, downwards q4 -> q3 -> q2 -> q1 and upwards
# q4 -> q5 -> q6, run side by side, one CPU thread each. Each step is resumable: rerun the
# script after an interruption and it continues where the checkpoints left off.
#
#   ./scripts/train_zoo.sh            # both chains (about 70 minutes on 2 idle CPU cores)
#
# (q1 and q6 got 3,000 and 4,000 steps where 6,000 and 9,000 were planned, to fit the
# session that trained them; rerun with larger numbers to train them further.)
#   ./scripts/train_zoo.sh down|up    # one chain
#
# Since 2026-12-06 the zoo is decode-only (msh-vr5 took its quality levels over): its ids name
# their weights for good, since old streams decode with them, and the encoders the chains
# start from no longer ship. So this script is the record of how the zoo was trained; it
# refuses to run on this tree. (Commit bc228f2 and earlier run it.)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import json, sys; sys.exit(any(m.get('decode_only') for m in json.load(open('codec/weights/registry.json'))['models'] if m['id'].startswith('msh-small-q')))"; then
  echo "the zoo (msh-small-q1..q6) is decode-only: its ids keep their weights for good, so it is not retrained; train the variable-rate model instead (./scripts/train_vr.sh)" >&2
  exit 2
fi
[ -d .venv ] && . .venv/bin/activate
DATA=(--data ../shared/data/bsds500/train --data ../shared/data/wikipedia-photos/train)
COMMON=(--N 64 --M 96 --crop 128 --batch-size 8 --lr 2e-4 --lr-drop-at 0.85 --quiet)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# one Q LAMBDA STEPS INIT PARENT: train quality Q for STEPS steps from INIT (the weights of
# model PARENT), export msh-small-qQ.
one() {
  local q=$1 lmbda=$2 steps=$3 init=$4 parent=$5
  python -m jobs.cli train "${DATA[@]}" "${COMMON[@]}" --checkpoint "runs/zoo/q$q.ckpt" \
    --lmbda "$lmbda" --steps "$steps" --init-from "$init" --export "msh-small-q$q" \
    --quality "$q" --note "fine-tuned from $parent: $steps steps, lr 2e-4 (x0.1 for the last 15%)" \
    2>>"runs/zoo/q$q.stderr"
}

down() {
  one 3 0.0067 6000 msh-small-q4 msh-small-q4
  one 2 0.0035 6000 runs/zoo/q3.ckpt msh-small-q3
  one 1 0.0018 3000 runs/zoo/q2.ckpt msh-small-q2
}

up() {
  one 5 0.025 9000 msh-small-q4 msh-small-q4
  one 6 0.0483 4000 runs/zoo/q5.ckpt msh-small-q5
}

mkdir -p runs/zoo
case "${1:-both}" in
  down) down ;;
  up) up ;;
  both) down & d=$!; up & u=$!; wait $d; wait $u ;;
  *) echo "usage: $0 [down|up|both]" >&2; exit 2 ;;
esac
