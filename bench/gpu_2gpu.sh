# The two-GPU runs of docs/benchmarks.md (2026-11-22, run 17): bench.gpu_serve on 1P1D across
# two GPUs and on two colocated replicas, then bench.compare on the long-prompt workload.
# On a two-GPU machine:  bash bench/device_run.sh bash bench/gpu_2gpu.sh
set -u
nvidia-smi -L
bash bench/gpu_serve_runs.sh pd2:configs/llama3-8b-2gpu.yaml \
  colo2:configs/llama3-8b-2gpu-colocated.yaml
echo "=== compare $(date -u +%H:%M:%S)"
timeout 260 python -m bench.compare configs/llama3-8b-2gpu-colocated.yaml configs/llama3-8b-2gpu.yaml \
  --stop-cmd none --workload long-prompt --num-prompts 32 --sweep-rates 2,4,8 \
  --slo-ttft-ms 1000 --slo-tpot-ms 50 --vocab-size 1000 --count-empty-chunks \
  --extra-body '{"logprobs": 0}' --seed 0 --no-progress --out $OUT/compare-2gpu.json 2>&1 \
  | grep -v "INFO\|WARNING" | tail -25
