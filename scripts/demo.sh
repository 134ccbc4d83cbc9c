#!/usr/bin/env bash
# Set up (idempotent) and run the main job on embedded defaults: encode and decode a few real
# photos (scikit-image's sample images) into ./demo-out, printing a summary line per image.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/sgarc demo --out demo-out "$@"
