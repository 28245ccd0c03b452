# The token-path runs (docs/benchmarks.md, 2026-12-01): the Serve workload through the engine
# alone, then through Serve with the committed GPU configs and their variants.
# On the GPU machine:  bash bench/device_run.sh bash bench/gpu_token_path.sh [NAME ...]
# NAMEs (default: offline pd colo): tests (the GPU tests: the files in GPU_TESTS, default
# tests/gpu, within TESTS_S seconds, default 240; output in $OUT/pytest.log), offline,
# offline_fp8 (the engine alone, bf16 / fp8 weights and KV), pd (configs/llama3-8b-gpu.yaml:
# 1P1D on one GPU, cuda_ipc), colo (the colocated config), pd_fp8_mps
# (configs/llama3-8b-gpu-fp8.yaml under MPS), pd_proxy / colo_proxy (Serve's Python proxy
# instead of the HAProxy ingress: Ray is restarted without it, then with it again),
# any variant of bench/gpu_variants.py (`python -m bench.gpu_variants --list`; also
# <BASE>_gil<X> and <BASE>_batch<N>), and three comparisons under MPS (bench.compare):
# lp_mps (long prompts, 2048 in / 16 out, 48 per Poisson rate in LP_RATES (default 16,24 req/s),
# SLOs TTFT <= 1 s and TPOT <= 20 ms: pd_mps_even against pd_mps; lp_hold_mps: pd_mps against
# pd_mps_hold1000, the decode hold of engine/decode_hold.py) and sp_local_mps (a
# shared-prefix workload, 16 groups of 16 requests, 1024-token prefix + 32-token suffix, 128 out,
# 64 at a time: `decode.local_prefill_max_tokens` 0 against 64, the config's).
# A name with "_mps" runs under CUDA MPS (the two replicas' kernels side by side on the GPU
# instead of in turns): Ray is restarted under an MPS control daemon, then without it again.
# With PDSERVE_STEP_LOG=DIR in the environment of bench/device_run.sh, every serving replica
# writes a line per engine step there (engine/step_log.py; Ray's workers inherit the variable
# from `ray start`), and DIR goes back as $OUT/steplog.tar.gz at the end. Likewise
# PDSERVE_HOP_LOG=DIR: a line each time a request passes a hop of the serving path
# (engine/hop_log.py), back as $OUT/hoplog.tar.gz; `python -m bench.hop_report DIR --client
# NAME.json` reads one run's.
set -u
C=configs/llama3-8b-gpu.yaml; K=configs/llama3-8b-gpu-colocated.yaml
variants() {  # /tmp/<NAME>.yaml for each NAME; fails for a name that is no variant
  python -m bench.gpu_variants --out-dir /tmp "$@" > /dev/null
}
restart_ray() {  # $1: RAY_SERVE_ENABLE_HA_PROXY for the new Ray instance (as in device_run.sh)
  ray stop > /dev/null 2>&1
  RAY_SERVE_ENABLE_HA_PROXY=$1 ray start --head --num-gpus=$(nvidia-smi -L | wc -l) \
    --include-dashboard=false --disable-usage-stats > /dev/null
}
mps() {  # $1: on / off. Clients find the daemon through CUDA_MPS_PIPE_DIRECTORY (inherited
  # from `ray start` by every worker), so Ray restarts around it. `mps on` fails (Ray back up
  # without MPS) when CUDA cannot start under the daemon.
  ray stop > /dev/null 2>&1
  local ok=0
  if [ $1 = on ]; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
    nvidia-cuda-mps-control -d && echo "MPS control daemon started"
    timeout 60 python -c "import torch; torch.zeros(1, device='cuda'); print('CUDA under MPS: ok')" \
      || { echo "CUDA under MPS failed"; ok=1; }
  else
    echo get_server_list | nvidia-cuda-mps-control | sed 's/^/MPS servers: /'
  fi
  if [ $1 = off ] || [ $ok = 1 ]; then
    echo quit | nvidia-cuda-mps-control; sleep 1
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
  restart_ray "${RAY_SERVE_ENABLE_HA_PROXY:-1}"
  return $ok
}
compare_under_mps() {  # $1: name ($OUT/$1.json), $2: time limit s, $3: lines of output shown;
  # the rest: bench.compare's configs and options. Random-weight servers on the model
  # `bench.gpu_serve --make-model-only` makes, under an MPS daemon.
  python -m bench.gpu_serve --make-model-only > /dev/null  # what the configs load
  if mps on; then
    timeout "$2" python -m bench.compare "${@:4}" --stop-cmd none --settle 2 --vocab-size 1000 \
      --count-empty-chunks --extra-body '{"logprobs": 0}' --seed 0 --no-progress \
      --out "${OUT:-/tmp}/$1.json" 2>&1 | grep -v "INFO\|WARNING" | tail -"$3"
    mps off
  fi
}
save_logs() {  # the logs so far go back as one file each ($OUT returns few files; tar xzf
  # NAME.tar.gz -C DIR), after every name: a call cut at its time limit keeps them (run 156's
  # were lost so)
  if [ -n "${PDSERVE_STEP_LOG:-}" ] && [ -d "$PDSERVE_STEP_LOG" ] && [ -n "${OUT:-}" ]; then
    tar czf "$OUT/steplog.tar.gz" -C "$PDSERVE_STEP_LOG" .
  fi
  if [ -n "${PDSERVE_HOP_LOG:-}" ] && [ -d "$PDSERVE_HOP_LOG" ] && [ -n "${OUT:-}" ]; then
    tar czf "$OUT/hoplog.tar.gz" -C "$PDSERVE_HOP_LOG" .
  fi
}
# The engine alone's time limit: FlashInfer compiles its kernels on first use, ~4 minutes on a
# machine without the JIT cache (run 144 lost its figure to a 240 s limit so).
if [ -d ~/.cache/flashinfer ]; then OFFLINE_S=240; else OFFLINE_S=480; fi
for name in "${@:-offline pd colo}"; do
  for n in $name; do
    case $n in
      tests)  # the GPU tests ($GPU_TESTS, default tests/gpu) within $TESTS_S (default 240) s,
        # their whole output to $OUT/pytest.log (a `tail` in a device command lost run 148's)
        log=${OUT:-/tmp}/pytest.log
        (unset RAY_ADDRESS PDSERVE_HOP_LOG PDSERVE_STEP_LOG
         timeout ${TESTS_S:-240} python -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/gpu} \
           > $log 2>&1; echo "pytest exit $? (124: cut at ${TESTS_S:-240} s), output in $log")
        tail -3 $log ;;
      offline) timeout $OFFLINE_S python -m bench.gpu_offline --budgets 8192 --overlap on 2>&1 | tail -4 ;;
      offline_fp8) timeout $OFFLINE_S python -m bench.gpu_offline --budgets 8192 --overlap on --quantize fp8 \
                     --kv-cache-dtype fp8_e4m3 2>&1 | tail -6 ;;
      pd) bash bench/gpu_serve_runs.sh pd:$C ;;
      colo) bash bench/gpu_serve_runs.sh colo:$K ;;
      pd_proxy | colo_proxy)
        restart_ray 0
        if [ $n = pd_proxy ]; then cfg=$C; else cfg=$K; fi
        RAY_SERVE_ENABLE_HA_PROXY=0 bash bench/gpu_serve_runs.sh $n:$cfg
        restart_ray "${RAY_SERVE_ENABLE_HA_PROXY:-1}" ;;
      pd_fp8_mps)
        if mps on; then bash bench/gpu_serve_runs.sh $n:configs/llama3-8b-gpu-fp8.yaml; mps off; fi ;;
      lp_mps)  # long prompts under MPS: goodput with the decode replica at normal, then below
        variants pd_mps_even pd_mps && compare_under_mps lp_mps 560 14 /tmp/pd_mps_even.yaml \
          /tmp/pd_mps.yaml --labels normal,below --workload long-prompt --num-prompts 48 \
          --sweep-rates ${LP_RATES:-16,24} --slo-ttft-ms 1000 --slo-tpot-ms 20 ;;
      lp_hold_mps)  # long prompts under MPS: the config against its decode hold of 1000 ms
        variants pd_mps pd_mps_hold1000 && compare_under_mps lp_hold_mps 560 14 /tmp/pd_mps.yaml \
          /tmp/pd_mps_hold1000.yaml --labels config,hold1000 --workload long-prompt \
          --num-prompts 48 --sweep-rates ${LP_RATES:-16,24} --slo-ttft-ms 1000 --slo-tpot-ms 20 ;;
      sp_local_mps)  # shared prefixes: every prompt remote, against local when cached
        variants pd_local0_mps pd_local64_mps && compare_under_mps sp_local_mps 500 24 \
          /tmp/pd_local0_mps.yaml /tmp/pd_local64_mps.yaml --labels remote,local64 \
          --workload shared-prefix --num-groups 16 --group-size 16 --prefix-len 1024 \
          --suffix-len 32 --output-len fixed:128 --concurrency 64 ;;
      *_mps*)
        if variants $n && mps on; then bash bench/gpu_serve_runs.sh $n:/tmp/$n.yaml; mps off; fi ;;
      *) if variants $n; then bash bench/gpu_serve_runs.sh $n:/tmp/$n.yaml; fi ;;
    esac
    save_logs
  done
done
