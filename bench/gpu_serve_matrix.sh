# The Serve runs of docs/benchmarks.md (2026-11-22): bench.gpu_serve over the committed GPU
# configs and three variants made with sed. Run on the GPU machine:
#   bash bench/device_run.sh bash bench/gpu_serve_matrix.sh
set -u
C=configs/llama3-8b-gpu.yaml; K=configs/llama3-8b-gpu-colocated.yaml
sed -e 's/kv_transport: cuda_ipc .*/kv_transport: ray/' $C > /tmp/ray.yaml
sed -e 's/max_num_batched_tokens: 8192}/max_num_batched_tokens: 2048}/' $K > /tmp/colo2k.yaml
sed -e 's/stream_interval_ms: 100 .*/stream_interval_ms: 250/' $C > /tmp/s250.yaml
bash bench/gpu_serve_runs.sh ipc:$C s250:/tmp/s250.yaml ray:/tmp/ray.yaml colo8k:$K \
  colo2k:/tmp/colo2k.yaml
