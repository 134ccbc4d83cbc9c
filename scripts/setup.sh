#!/usr/bin/env bash
# Create .venv and install sgarc. torch==2.13.0 goes first so pip takes the CPU build on disk
# instead of pulling CUDA packages for a newer release.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
log=.venv/setup.log
# Quiet on success; the whole pip log on failure.
if ! { .venv/bin/python -m pip install "torch==2.13.0" &&
       .venv/bin/python -m pip install -e ".[dev]"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup failed; log: $log" >&2
    exit 1
fi
