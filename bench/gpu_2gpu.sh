# The two-GPU runs of docs/benchmarks.md (2026-11-22, run 17): bench.gpu_serve on 1P1D across
# two GPUs and on two colocated replicas, then bench.compare on the long-prompt workload.
# On a two-GPU machine:  bash bench/device_run.sh bash bench/gpu_2gpu.sh
set -u
nvidia-smi -L
for run in pd2:configs/llama3-8b-2gpu.yaml colo2:configs/llama3-8b-2gpu-colocated.yaml; do
  name=${run%%:*}; cfg=${run#*:}
  echo "=== $name ($cfg) $(date -u +%H:%M:%S)"
  timeout 200 python -m bench.gpu_serve --skip-hf --config $cfg --out-dir /tmp/r_$name 2>&1 | grep -v "INFO\|WARNING" | tail -4
  cp /tmp/r_$name/serve.json $OUT/$name.json 2>/dev/null
  grep -i "Traceback\|Error" /tmp/r_$name/serve.log | head -5
done
echo "=== compare $(date -u +%H:%M:%S)"
timeout 260 python -m bench.compare configs/llama3-8b-2gpu-colocated.yaml configs/llama3-8b-2gpu.yaml \
  --stop-cmd none --workload long-prompt --num-prompts 32 --sweep-rates 2,4,8 \
  --slo-ttft-ms 1000 --slo-tpot-ms 50 --vocab-size 1000 --count-empty-chunks \
  --extra-body '{"logprobs": 0}' --seed 0 --no-progress --out $OUT/compare-2gpu.json 2>&1 | grep -v "INFO\|WARNING" | tail -25
