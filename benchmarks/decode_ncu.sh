# Nsight Compute on the decode-kernel cases of the summary figures (64K keys, batch 16; GPU): where
# the time goes (DRAM throughput against its peak, occupancy, warp stall reasons) for duo's
# paged_decode + combine and, where vLLM is importable, FA3's paged decode on the same shape.
#   bash benchmarks/decode_ncu.sh                 # writes $OUT/ncu/<case>.txt and prints the key lines
#   CASES="duo:0.5 duo:0 fa3:0" CONTEXT=131072 bash benchmarks/decode_ncu.sh
# Clocks are left as the GPU runs them (--clock-control none), so durations match the timed benchmark.
out=${OUT:-/tmp/out}/ncu
mkdir -p "$out"
NCU=${NCU:-ncu}
command -v "$NCU" > /dev/null || { echo "decode_ncu: no '$NCU' on PATH (set NCU=/path/to/ncu)"; exit 1; }
sections="--section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats
  --section WarpStateStats --section SchedulerStats"
for case in ${CASES:-duo:0.5 duo:0.75 duo:0 fa3:0}; do
  backend=${case%%:*} streaming=${case#*:}
  if [ "$backend" = fa3 ] && ! python3 -c "import vllm" 2> /dev/null; then
    echo "decode_ncu: $case skipped (vLLM is not importable)"; continue
  fi
  [ "$backend" = fa3 ] && kernels=regex:device_kernel || kernels='regex:paged_decode|combine'
  name="${backend}_s${streaming}_${CONTEXT:-65536}_b${BATCH:-16}"
  # Skip the first call's kernels (two: the decode and its combine), profile the second call's.
  $NCU --clock-control none $sections -k "$kernels" --launch-skip 2 --launch-count 2 \
    python3 benchmarks/decode_case.py --backend "$backend" --streaming "$streaming" \
    --context "${CONTEXT:-65536}" --batch "${BATCH:-16}" > "$out/$name.txt" 2>&1
  echo "===== $name (rc $?)"
  grep -E "^  [a-zA-Z_:<>, ()0-9]+\(|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit Reg|Grid Size|Warp Cycles Per Issued|No Eligible|Eligible Warps|==ERROR==|==WARNING==" "$out/$name.txt" | head -60
done
