# bench.gpu_serve (--skip-hf) once per NAME:CONFIG argument; each run's results go to
# $OUT/NAME.json, and its waves (bench.waves) and its server log's errors are printed. Used by
# gpu_serve_matrix.sh and gpu_2gpu.sh, on the GPU machine under bench/device_run.sh.
# GPU_SERVE_ARGS in the environment adds arguments (e.g. "--client-processes 4").
set -u
for run in "$@"; do
  name=${run%%:*}; cfg=${run#*:}
  echo "=== $name ($cfg) $(date -u +%H:%M:%S)"
  timeout 200 python -m bench.gpu_serve --skip-hf --config "$cfg" --out-dir "/tmp/r_$name" \
    ${GPU_SERVE_ARGS:-} 2>&1 \
    | grep -v "INFO\|WARNING" | tail -9
  cp "/tmp/r_$name/serve.json" "$OUT/$name.json" 2>/dev/null \
    && python -m bench.waves "/tmp/r_$name/serve.json" | tail -n +2  # when each wave ran
  grep -i "Traceback\|Error" "/tmp/r_$name/serve.log" | head -5
done
