# Wait for background runs of benchmarks/device_bg.sh (all of them together at most WAIT seconds,
# default 560; WAIT=0 takes a snapshot), then copy each one's packed groups to $OUT/NAME.tgz (what
# they have so far if still running) with its log, and print each group's tail.
#   bash benchmarks/device_bg_wait.sh n2 main
OUT=${OUT:-/tmp/out}
WAIT=${WAIT:-560}
mkdir -p "$OUT"
for name in "$@"; do
  dir=/tmp/bg/$name
  if [ ! -d "$dir" ]; then echo "device_bg_wait: no background run '$name' (a fresh machine?)"; continue; fi
  while [ ! -f "$dir/done" ] && (( SECONDS < WAIT )); do sleep 5; done
  [ -f "$dir/done" ] && state=finished || state="still running"
  echo "===== $name: $state after ${SECONDS}s"
  tar czf "$OUT/$name.tgz" -C "$dir/par" . && cp "$dir/log" "$OUT/$name.log"
  for d in "$dir"/par/g*; do echo "##### $name/${d##*/}"; tail -20 "$d/run.log"; done
done
