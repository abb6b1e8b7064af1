# Several benchmarks/device_run.sh groups side by side on one device call, one per GPU set:
#   bash benchmarks/device_parallel.sh "all:ray" "0:prefix-cache soak-fa" "1:niah-suite"
# A group is GPUS:STAGES ("all" = every GPU, else a CUDA_VISIBLE_DEVICES value). Groups share
# GPUs only with stages that size their KV cache in bytes (FREE_GPU=0: no group kills another's
# engines). Group i writes to $PAR/g<i> (default /tmp/par; its log, results and evidence rows),
# packed into $OUT/parallel.tgz at the end; the tail of each group's log is printed. BUDGET applies
# per group. Two trees (say two branches) can share a call: give each its own PAR and OUT.
OUT=${OUT:-/tmp/out}
PAR=${PAR:-/tmp/par}
rm -rf "$PAR" && mkdir -p "$PAR" "$OUT"
i=0
for group in "$@"; do
  gpus=${group%%:*} stages=${group#*:} dir=$PAR/g$i
  mkdir -p "$dir"
  if [ "$gpus" = all ]; then unset CUDA_VISIBLE_DEVICES; else export CUDA_VISIBLE_DEVICES=$gpus; fi
  # shellcheck disable=SC2086  # stages are words
  FREE_GPU=0 OUT=$dir VLLM_DUO_EVIDENCE=$dir/evidence.jsonl bash benchmarks/device_run.sh $stages \
    > "$dir/run.log" 2>&1 &
  i=$((i + 1))
done
unset CUDA_VISIBLE_DEVICES
wait
tar czf "$OUT/parallel.tgz" -C "$PAR" .
for d in "$PAR"/g*; do echo "##### $d"; tail -25 "$d/run.log"; done
