# Start benchmarks/device_parallel.sh groups in the background on the device machine, so they run on
# while the next calls carry the rest of a kit (the device ends a call's processes when it returns,
# except those in a new session: setsid). They run from a copy of this tree at /tmp/bg/NAME/tree
# without its hidden folders (later calls replace the checkout and drop ignored paths they do not
# carry), with a copy of the kit's scripts, BUDGET seconds per group (default 1500); /tmp/bg/NAME/done marks the end.
#   bash benchmarks/device_bg.sh n2 "0:kernels agreement"        # DUO_KIT picks the kit, as device_run
#   bash benchmarks/device_bg_wait.sh n2                           # a later call: wait, pack into $OUT
name=${1:?usage: device_bg.sh NAME GPUS:STAGES...}
shift
dir=/tmp/bg/$name
rm -rf "$dir" && mkdir -p "$dir/tree" "$dir/kit"
tar cf - --exclude='./.[!.]*' . | tar xf - -C "$dir/tree"
cp -r "${DUO_KIT:-.devkit}/bin" "$dir/kit/"
cd "$dir/tree" || exit 1
DUO_KIT=$dir/kit OUT=$dir/out PAR=$dir/par BUDGET=${BUDGET:-1500} setsid nohup \
  bash -c 'bash benchmarks/device_parallel.sh "$@"; touch "$0/done"' "$dir" "$@" > "$dir/log" 2>&1 < /dev/null &
echo "device_bg: $name started in $dir: $*"
