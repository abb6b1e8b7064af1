# Run named GPU stages on the device machine (after ../shared/devkit's device-install calls),
# each under its own time limit, logs and results copied to $OUT. One device call, for example:
#   bash benchmarks/device_run.sh kernels agreement
# carry: [".devkit/bin", "vllm_duo/_C.abi3.so"] (patterns are built into the package). A stage's failure does not stop the next.
# On a machine with several GPUs, benchmarks/device_parallel.sh runs one device_run per GPU set
# at once, each with its own CUDA_VISIBLE_DEVICES and OUT.
# BUDGET (seconds, default 585) caps the whole call below the device's 10-minute limit: each stage's
# time limit shrinks to what is left, a stage with under 30 s left is skipped, and results are copied
# back after every stage so a cut-off call still returns what finished. SOAK_ARGS, PREFIX_ARGS, SHORT_ARGS, CHAT_ARGS,
# CAPACITY_ARGS, ADMIT_ARGS (capacity-admit, say --requests 25), SUITE_ARGS, IDENTIFY_ARGS, NIAH_ARGS (both niah-grid stages), NIAH_FP8_ARGS (niah-grid-fp8 only), RAY_GRAPHS_K (ray-graphs: a pytest -k of its variants), WINDOW_ARGS (window-configs: replace its lengths/batches, add --window): extra flags of those stages
# (PATTERN_OUT: identify's folder). Variants, several per call: identify-NAME trains with IDENTIFY_ARGS_NAME into
# /tmp/patterns/NAME; niah-suite-NAME runs the suite with SUITE_ARGS_NAME (say --pattern /tmp/patterns/NAME),
# writing niah_suite_NAME_<date>.json and the figure niah_suite_smollm2_NAME.
source benchmarks/device_setup.sh
export PYTHONUNBUFFERED=1
# GPU tests append evidence rows here; kept on the machine while it is warm, copied to $OUT after
# every stage (collect with benchmarks/evidence.py).
export VLLM_DUO_EVIDENCE=${VLLM_DUO_EVIDENCE:-/tmp/evidence.jsonl}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
marker=$(mktemp)  # results written after this are copied back (the device returns few files)
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
BUDGET=${BUDGET:-585}
left() { local l=$((BUDGET - SECONDS - 10)); echo $(( $1 < l ? $1 : l )); }
gpu_test() { timeout "$(left "$1")" python -m pytest -q -s -m gpu -p no:cacheprovider "${@:2}"; }
run_for() { timeout "$(left "$1")" "${@:2}"; }
free_gpu() {  # a stage cut off by its time limit may leave engine processes holding GPU memory
  [ "${FREE_GPU:-1}" = 0 ] && return  # FREE_GPU=0: runs share the GPUs, kill nothing
  if [ -n "$CUDA_VISIBLE_DEVICES" ]; then  # another device_run may own the other GPUs: only ours
    nvidia-smi -i "$CUDA_VISIBLE_DEVICES" --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null
  else
    nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9 2>/dev/null
    pkill -9 -f "VLLM::|vllm.entrypoints|vllm_duo.eval.engine_proc" 2>/dev/null
  fi
  sleep 2
}
mixed_part() { run_for 580 python benchmarks/mixed_traffic.py --requests 1000 --backends "$1" --part-out "$OUT/mixed_$1.json"; }
copy_results() {  # flat: the device drops nested folders under $OUT
  find benchmarks/results -type f -newer "$marker" -exec cp {} "$OUT/" \;
  [ -f "$VLLM_DUO_EVIDENCE" ] && cp "$VLLM_DUO_EVIDENCE" "$OUT/"
}
for stage in "$@"; do
  if (( $(left 600) < 30 )); then echo "=== $stage skipped: budget spent"; continue; fi
  echo "=== $stage $(date +%T) (${SECONDS}s into the call)"
  case $stage in
    kernels) gpu_test 300 tests/kernels ;;
    agreement) gpu_test 580 tests/e2e/test_agreement_gpu.py ;;
    ray) gpu_test 580 tests/e2e/test_ray_gpu.py -k "not graphs" ;;  # TP=2 / PP=2 eager
    ray-graphs) gpu_test 900 tests/e2e/test_ray_gpu.py -k "graphs ${RAY_GRAPHS_K:+and $RAY_GRAPHS_K}" ;;  # TP=2, compile + CUDA graphs (RAY_GRAPHS_K: one variant)
    cudagraph) gpu_test 400 tests/e2e/test_cudagraph_gpu.py ;;
    warmup) gpu_test 300 tests/e2e/test_warmup_gpu.py ;;
    short-prompt) run_for 500 python benchmarks/short_prompt.py $SHORT_ARGS ;;
    mixed-traffic) run_for 580 python benchmarks/mixed_traffic.py ;;
    mixed-traffic-duo) mixed_part duo ;;  # the 1,000-request run, one backend per GPU: --combine after
    mixed-traffic-fa) mixed_part FLASH_ATTN ;;
    chat) run_for 580 python benchmarks/chat.py $CHAT_ARGS ;;
    server) gpu_test 560 tests/e2e/test_server_gpu.py ;;
    prefix-cache) gpu_test 580 tests/e2e/test_prefix_cache_gpu.py $PREFIX_ARGS ;;
    prefill-attention) run_for 300 python benchmarks/prefill.py --part attention --lengths 32768 131072 --chunks 16384 0 ;;
    window-configs) run_for 300 python benchmarks/prefill.py --part window-configs ${WINDOW_ARGS:---lengths 1024 32768 --batches 64 1} ;;
    prefill-model) run_for 580 python benchmarks/prefill.py --part model --lengths 32768 131072 --sparsities 0.5 0.75 ;;
    prefill-256k) run_for 580 python benchmarks/prefill.py --part model --lengths 262144 --sparsities 0.5 0.75 --repeats 2 ;;
    capacity) run_for 580 python benchmarks/capacity.py $CAPACITY_ARGS ;;
    capacity-admit) run_for 580 python benchmarks/capacity.py --admit --modes window $ADMIT_ARGS ;;
    decode) run_for 400 python benchmarks/decode_kernel.py --repeats 20 ;;
    decode-fp8) run_for 400 python benchmarks/decode_kernel.py --repeats 20 --kv-cache-dtype fp8 ;;
    decode-kernels) run_for 400 python benchmarks/decode_kernel.py --repeats 20 --contexts 1024 65536 131072 \
      --batches 16 64 --kernels tensor_core scalar ;;  # duo's two kernels beside FA3, one run
    decode-kernels-fp8) run_for 400 python benchmarks/decode_kernel.py --repeats 20 --contexts 65536 131072 \
      --batches 16 64 --kernels tensor_core scalar --kv-cache-dtype fp8 ;;
    decode-ncu) run_for 200 bash benchmarks/decode_ncu.sh ;;
    decode-hybrid) run_for 300 python benchmarks/decode_kernel.py --repeats 20 --contexts 65536 131072 --batches 16 64 --hybrid ;;
    decode-sweep) run_for 400 python benchmarks/decode_kernel.py --repeats 10 --contexts 1024 4096 65536 131072 \
      --batches 16 64 --partition-sizes 0 1024 2048 4096 ;;
    max-context) run_for 590 python benchmarks/max_context.py ;;
    max-context-fp8) run_for 590 python benchmarks/max_context.py --kv-cache-dtype fp8 ;;
    soak) run_for 570 python benchmarks/soak_gpu.py $SOAK_ARGS ;;
    soak-fa) run_for 570 python benchmarks/soak_gpu.py --backend FLASH_ATTN $SOAK_ARGS ;;  # the re-run control
    load) run_for 570 python benchmarks/server_load.py ;;
    identify) run_for 590 python -m vllm_duo.cli.main identify /tmp/models/smollm2-135m-instruct \
      --out "${PATTERN_OUT:-$OUT/pattern}" --max-minutes 8 $IDENTIFY_ARGS ;;  # then SUITE_ARGS=--pattern DIR
    niah-suite) run_for 580 python benchmarks/niah_suite.py --runner engine $SUITE_ARGS ;;
    niah-grid) run_for 500 python -m vllm_duo.cli.main niah --pattern smollm2-135m-instruct --samples 2 \
      --record niah_smollm2 --out "$OUT/niah" --quiet $NIAH_ARGS ;;
    niah-grid-fp8) run_for 500 python -m vllm_duo.cli.main niah --pattern smollm2-135m-instruct --samples 2 \
      --kv-cache-dtype fp8 --record niah_smollm2_fp8 --out "$OUT/niah_fp8" --quiet $NIAH_ARGS $NIAH_FP8_ARGS ;;
    bench-window) run_for 580 python -m vllm_duo.cli.main bench --only a b --streaming-prefill window --quiet ;;
    bench-admitted) run_for 580 python -m vllm_duo.cli.main bench --only a --a-admitted --streaming-prefill window --quiet ;;
    bench-fp8) run_for 580 python -m vllm_duo.cli.main bench --only a --kv-cache-dtype fp8 --quiet ;;
    identify-*) flags=IDENTIFY_ARGS_${stage#identify-}
      run_for 590 python -m vllm_duo.cli.main identify /tmp/models/smollm2-135m-instruct \
        --out "/tmp/patterns/${stage#identify-}" --max-minutes 8 ${!flags} ;;
    niah-suite-*) v=${stage#niah-suite-} flags=SUITE_ARGS_${stage#niah-suite-}
      run_for 580 python benchmarks/niah_suite.py --runner engine --kv-cache-gib 8 --name "niah_suite_$v" \
        --record "niah_suite_smollm2_$v" ${!flags} ;;
    *) echo "unknown stage $stage" ;;
  esac 2>&1 | grep -v "^INFO\|^(EngineCore.*INFO\|^DEBUG" | tee "$OUT/$stage.log" | tail -40
  copy_results
  free_gpu
done
