#!/usr/bin/env bash
# One prepared run for a lent GPU machine (see README "Benchmarks"): the CUDA tests, then every
# benchmark that takes --device cuda, each under its own time limit, the tables written to
# $OUT (the device tool's output folder) or docs/gpu/. Usage, from the repository root:
#
#     bash tools/gpu_check.sh            # about 8 minutes on one H200
#     QUICK=1 bash tools/gpu_check.sh    # --quick benches only, about 3 minutes
#
# It needs a python with a CUDA build of torch (and the project's dependencies); the project
# itself is installed in place without touching the network if it is not importable yet.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-docs/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export WANDB_MODE=offline

if ! "$py" -c "import lightning_struct" 2>/dev/null; then
    "$py" -m pip install --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || true
fi
{
    date -u
    nvidia-smi || true
    "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} >"$out/machine.txt" 2>&1

# the CUDA tests: every test that is skipped without a GPU (spectra, warm norms, FFT conv, DCT,
# ACDC on GPU against the CPU values), plus the numeric suites they sit in
timeout 240 "$py" -m pytest -q -rs -p no:cacheprovider \
    tests/ops/test_spectral.py tests/ops/test_spectral_warm.py tests/ops/test_fftconv.py \
    tests/ops/test_dct.py tests/nn/test_fftconv_nn.py tests/nn/test_acdc.py >"$out/cuda_tests.txt" 2>&1
echo "cuda tests: exit $? (tail of $out/cuda_tests.txt)"
tail -3 "$out/cuda_tests.txt"

quick=${QUICK:+--quick}
# spectral is CPU-only (numpy baselines); the others take --device cuda
for name in force acdc fftconv convert; do
    timeout 150 "$py" -m lightning_struct.cli bench "$name" $quick --device cuda \
        --json "$out/bench_$name.json" >"$out/bench_$name.txt" 2>&1
    echo "bench $name: exit $?"
    tail -4 "$out/bench_$name.txt"
done
date -u >>"$out/machine.txt"
