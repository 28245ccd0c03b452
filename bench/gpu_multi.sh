# Issue 17's runs on 2 or 4 GPUs: P/D against colocated replicas at equal GPUs, swept to
# saturation on two workloads with SLOs (TTFT <= 1 s, TPOT <= 25 ms); on 2 GPUs also the nccl
# channel against a GPU-to-GPU copy. Configs come from bench/gpu_layouts.py.
#
#   bash bench/device_run.sh bash bench/gpu_multi.sh transfer long chat     # on the GPU machine
#   DRY=1 OUT=/tmp/multi bash bench/gpu_multi.sh long                       # on CPU: tiny model
#
# Parts (default: transfer long chat): transfer (bench.gpu_transfer --channel nccl, 2+ GPUs),
# long (2048 in / 16 out), chat (512 in / 256 out). Each part writes $OUT/<part>-<N>gpu.json
# and SLO-attainment / latency plots under $OUT/plots-<part>-<N>gpu/. One device call is at most
# 10 minutes: give one part per call, and trim with LAYOUTS, RATES_LONG, RATES_CHAT, PROMPTS.
# Layouts: N=2: colo:2 1:1; N=4: colo:4 1:3 2:2 3:1 auto:4 (the autoscaler's own choice: its
# target replicas per role after each rate are in the JSON's runs, `metrics`).
set -u
OUT=${OUT:-/tmp/gpu_multi}
mkdir -p "$OUT"
if [ "${DRY:-0}" = 1 ]; then
  N=${GPUS:-2}
  BASES=(--base-pd configs/tiny.yaml --base-colo configs/tiny-colocated.yaml --transport gloo)
  SLO=(--slo-ttft-ms 2000 --slo-tpot-ms 200)
  LONG=(--workload long-prompt --input-len fixed:256 --output-len fixed:16)
  CHAT=(--workload synthetic --input-len fixed:64 --output-len fixed:32)
  RATES_LONG=${RATES_LONG:-1,2} RATES_CHAT=${RATES_CHAT:-1,2} PROMPTS=${PROMPTS:-8}
else
  N=${GPUS:-$(nvidia-smi -L | wc -l)}
  BASES=()
  SLO=(--slo-ttft-ms 1000 --slo-tpot-ms 25)
  LONG=(--workload long-prompt --input-len fixed:2048 --output-len fixed:16)
  CHAT=(--workload synthetic --input-len fixed:512 --output-len fixed:256)
  RATES_LONG=${RATES_LONG:-4,8,16,24,32} RATES_CHAT=${RATES_CHAT:-2,4,8,12,16}
  PROMPTS=${PROMPTS:-160}
fi
if [ "$N" -ge 4 ]; then DEFAULT_LAYOUTS="colo:4 1:3 2:2 3:1 auto:4"; else DEFAULT_LAYOUTS="colo:2 1:1"; fi
LAYOUTS=${LAYOUTS:-$DEFAULT_LAYOUTS}
# The SLO that auto:N scales to is the one the sweep judges by.
python -m bench.gpu_layouts "${BASES[@]}" "${SLO[@]}" --out-dir "$OUT/configs" $LAYOUTS || exit 1
configs=(); labels=()
for layout in $LAYOUTS; do
  name=$(python -c "from bench.gpu_layouts import Layout; print(Layout.parse('$layout').name)")
  configs+=("$OUT/configs/$name.yaml"); labels+=("$name")
done
label_list=$(IFS=,; echo "${labels[*]}")

for part in ${@:-transfer long chat}; do
  echo "=== $part, $N GPUs, $(date -u +%H:%M:%S)"
  case $part in
    transfer)
      if [ "${DRY:-0}" = 1 ] || [ "$N" -lt 2 ]; then
        echo "(skipped: a dry run, or fewer than 2 GPUs)"; continue
      fi
      timeout 300 python -m bench.gpu_transfer --channel nccl 2>&1 | grep -v "INFO\|WARNING" \
        | tee "$OUT/transfer-${N}gpu.txt" | tail -20 ;;
    long | chat)
      if [ $part = long ]; then W=("${LONG[@]}"); R=$RATES_LONG; else W=("${CHAT[@]}"); R=$RATES_CHAT; fi
      # The baseline (colocated) first; `serve run`'s interrupt shuts each app down, the Ray
      # instance of bench/device_run.sh stays up for the next one.
      python -m bench.compare "${configs[@]}" --labels "$label_list" --stop-cmd none \
        "${W[@]}" "${SLO[@]}" --num-prompts "$PROMPTS" --sweep-rates "$R" --vocab-size 1000 \
        --count-empty-chunks --extra-body '{"logprobs": 0}' --seed 0 --no-progress \
        --record-metrics pdserve_autoscaler_target_replicas \
        --out "$OUT/$part-${N}gpu.json" --plot-dir "$OUT/plots-$part-${N}gpu" 2>&1 \
        | grep -v "INFO\|WARNING" | tail -40 ;;
    *) echo "unknown part $part (transfer, long, chat)" ;;
  esac
done
