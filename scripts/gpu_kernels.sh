#!/usr/bin/env bash
# Kernel tests and benchmarks on one GPU (H100/H200): the gpu-marked kernel tests at model
# shapes, then the kernel benchmark at Llama-3.1-8B shapes against the copy and matmul
# ceilings measured in the same run. Writes kernels.json and logs into ${OUT:-benchmarks/results}.
source scripts/device_env.sh
out=${OUT:-benchmarks/results}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "gpu", torch.cuda.get_device_name())'

start=$SECONDS
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_*.py >"$out/kernels_tests.log" 2>&1
test_rc=$?
test_s=$((SECONDS - start))
tail -n 40 "$out/kernels_tests.log"

start=$SECONDS
python3 -m splitserve.benchmarks.kernels --out "$out/kernels.json" >"$out/kernels_bench.log" 2>&1
bench_rc=$?
bench_s=$((SECONDS - start))
[ "$bench_rc" -ne 0 ] && tail -n 40 "$out/kernels_bench.log"

echo
echo "== summary =="
echo "tests: rc=$test_rc in ${test_s}s: $(tail -n 1 "$out/kernels_tests.log")"
echo "benchmark: rc=$bench_rc in ${bench_s}s"
[ "$bench_rc" -eq 0 ] && python3 -m splitserve.benchmarks.kernels --summary "$out/kernels.json"
exit $((test_rc || bench_rc))
