#!/usr/bin/env bash
# Kernel tests and benchmarks on one GPU (H100/H200): the gpu-marked kernel tests at model
# shapes, then the kernel benchmark at Llama-3.1-8B shapes against the copy and matmul
# ceilings measured in the same run, then (while time is left) the small-shape kernel tests
# on the GPU, 16-bit dtypes included. Writes kernels.json and logs into
# ${OUT:-benchmarks/results}. SMALL_TESTS_DEADLINE_S: seconds after the start by which the
# small-shape tests must end (default 500).
source scripts/device_env.sh
out=${OUT:-benchmarks/results}
mkdir -p "$out"
deadline=${SMALL_TESTS_DEADLINE_S:-500}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "gpu", torch.cuda.get_device_name())'
# Compiling the many test specialisations dominates the test time: spread it over workers.
xdist=()
python3 -c 'import xdist' 2>/dev/null && xdist=(-n 8)
kernel_tests=(tests/test_kernels_attention.py tests/test_kernels_norm_rope.py tests/test_kernels_model.py)

start=$SECONDS
python3 -m pytest -q -m gpu -p no:cacheprovider -p no:benchmark "${xdist[@]}" "${kernel_tests[@]}" \
  >"$out/kernels_tests.log" 2>&1
test_rc=$?
test_s=$((SECONDS - start))
tail -n 40 "$out/kernels_tests.log"

start=$SECONDS
python3 -m splitserve.benchmarks.kernels --out "$out/kernels.json" >"$out/kernels_bench.log" 2>&1
bench_rc=$?
bench_s=$((SECONDS - start))
[ "$bench_rc" -ne 0 ] && tail -n 40 "$out/kernels_bench.log"

start=$SECONDS
left=$((deadline - SECONDS))
small_rc=skipped
if [ "$left" -gt 30 ]; then
  timeout "$left" python3 -m pytest -q -m "not gpu" -p no:cacheprovider -p no:benchmark \
    "${xdist[@]}" "${kernel_tests[@]}" >"$out/kernels_tests_small.log" 2>&1
  small_rc=$?
  tail -n 25 "$out/kernels_tests_small.log"
fi
small_s=$((SECONDS - start))

echo
echo "== summary =="
echo "gpu tests: rc=$test_rc in ${test_s}s: $(tail -n 1 "$out/kernels_tests.log")"
echo "small-shape tests on the GPU: rc=$small_rc in ${small_s}s" \
  "$( [ -f "$out/kernels_tests_small.log" ] && tail -n 1 "$out/kernels_tests_small.log")"
echo "benchmark: rc=$bench_rc in ${bench_s}s"
[ "$bench_rc" -eq 0 ] && python3 -m splitserve.benchmarks.kernels --summary "$out/kernels.json"
small_failed=0
[ "$small_rc" != skipped ] && [ "$small_rc" -ne 0 ] && small_failed=1
exit $((test_rc || bench_rc || small_failed))
