#!/usr/bin/env bash
# The GPU acceptance run (issue 15): every part on one GPU in <= 8 minutes, results in
# $OUT_DIR/gpu_acceptance.{json,md} (default runs/gpu_acceptance). On CPU: --dry-run.
#   bash benchmarks/gpu_acceptance.sh [--dry-run] [--parts a,b] [--out-dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python benchmarks/gpu_acceptance.py "$@"
