# Run named GPU stages on the device machine (after ../shared/devkit's device-install calls),
# each under its own time limit, logs and results copied to $OUT. One device call, for example:
#   bash benchmarks/device_run.sh kernels window-e2e reference
# carry: [".devkit/bin", "vllm_duo/_C.abi3.so", ".patterns"]. A stage's failure does not stop the next.
source benchmarks/device_setup.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
marker=$(mktemp)  # results written after this are copied back (the device returns few files)
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
gpu_test() { timeout "$1" python -m pytest -q -s -m gpu -p no:cacheprovider "${@:2}"; }
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    kernels) gpu_test 300 tests/kernels ;;
    window-e2e) gpu_test 420 tests/e2e/test_e2e_gpu.py -k "window_kernel or chunk_invariance or all_streaming" ;;
    e2e) gpu_test 580 tests/e2e/test_e2e_gpu.py -k "not mistral and not qwen2" ;;
    models) gpu_test 580 tests/e2e/test_e2e_gpu.py -k "mistral or qwen2" ;;
    reference) gpu_test 300 tests/e2e/test_reference_gpu.py ;;
    server) gpu_test 560 tests/e2e/test_server_gpu.py ;;
    prefix-cache) gpu_test 400 tests/e2e/test_prefix_cache_gpu.py ;;
    prefill-attention) timeout 300 python benchmarks/prefill.py --part attention --lengths 32768 131072 --chunks 16384 0 ;;
    prefill-model) timeout 580 python benchmarks/prefill.py --part model --lengths 32768 131072 --sparsities 0.5 ;;
    capacity) timeout 580 python benchmarks/capacity.py --patterns .patterns ;;
    decode) timeout 400 python benchmarks/decode_kernel.py --repeats 20 ;;
    soak) timeout 570 python benchmarks/soak_gpu.py ;;
    load) timeout 570 python benchmarks/server_load.py ;;
    bench-window) timeout 580 python -m vllm_duo.cli.main bench --only a b --streaming-prefill window --quiet ;;
    *) echo "unknown stage $stage" ;;
  esac 2>&1 | grep -v "^INFO\|^(EngineCore.*INFO\|^DEBUG" | tee "$OUT/$stage.log" | tail -40
done
mkdir -p "$OUT/results"
find benchmarks/results -type f -newer "$marker" -exec cp --parents {} "$OUT/results/" \;
