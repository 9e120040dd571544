#!/usr/bin/env bash
# Everything a lent GPU should check and time, in one call: the kernel and model tests on CUDA
# (compiled Triton, sync-debug mode), then every benchmark. Results land in one folder under
# benchmarks/results/ (JSON with device, versions and commit) to commit afterwards.
#   [PYTHON=python3] bash benchmarks/run_gpu_suite.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
"$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'run_gpu_suite.sh needs a CUDA GPU')" || exit 1
device=$("$py" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
out=${1:-benchmarks/results/${device}-$(date +%Y%m%d)}
mkdir -p "$out"
status=0
run() { echo "== $*"; "$@" || status=1; }
"$py" -m pytest -q -p no:cacheprovider tests/test_varlen_attention.py tests/test_patch_embed.py \
    tests/test_selection_ops.py tests/test_model_parity.py tests/test_no_host_sync.py 2>&1 | tee "$out/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
run "$py" benchmarks/bench_varlen_attention.py --out "$out/varlen_attention.json"
run "$py" benchmarks/bench_patch_embed.py --out "$out/patch_embed.json"
run "$py" benchmarks/bench_selection.py --out "$out/selection.json"
run "$py" -m ps3.bench --preset gpu-1.5k --out "$out/ps3-bench-1.5k"
run "$py" -m ps3.bench --preset gpu-4k --out "$out/ps3-bench-4k"
echo "results in $out (exit $status)"
exit $status
