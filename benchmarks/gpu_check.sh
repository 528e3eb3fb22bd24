#!/usr/bin/env bash
# The one prepared device check, for a session that is lent a GPU (the `device` tool's `run`):
#   1. the CUDA-marked tests (pytest -m cuda), 2. the benchmark on the GPU, every configuration.
# The device image has torch, timm, hypothesis and pytest; nothing is installed. Results go to $OUT (the
# tool's output folder, fetched back): device.txt, pytest_cuda.log, bench.log and the benchmark's JSON,
# which belongs in benchmarks/results/. Sized to end within one 10-minute call:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=600), then give_back.
set -o pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee "$OUT/device.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m cuda 2>&1 | tee "$OUT/pytest_cuda.log" | tail -5
timeout 400 python3 benchmarks/bench.py --device cuda --budget 25 --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -30
