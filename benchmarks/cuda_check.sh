#!/bin/sh
# The speed benchmark on a GPU, short: every case (classify, detect, segment, VGG) with 20 timed steps,
# one repeat, plain PyTorch against cnnkit's CUDA path; writes BENCHMARKS.md's cuda section.
# Under 3 minutes on one H100 once the built-in scenes exist (a fresh machine first generates them, about
# a minute, untimed). Usage, from anywhere:  sh benchmarks/cuda_check.sh [more speed.py flags]
# PYTHON picks the interpreter (default: python3, which must have torch with CUDA and cnnkit's dependencies).
set -eu
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python3}"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device here')"
start=$(date +%s)
"$PYTHON" -c "from cnnkit.data.scenes import ensure_scenes; print('scenes:', ensure_scenes())"
echo "scenes ready after $(( $(date +%s) - start )) s"
"$PYTHON" benchmarks/speed.py --device cuda --task all --steps 20 --warmup 3 --repeats 1 --write "$@"
echo "cuda_check: $(( $(date +%s) - start )) s in all"
