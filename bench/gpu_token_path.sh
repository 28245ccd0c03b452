# The token-path runs (docs/benchmarks.md, 2026-12-01): the Serve workload through the engine
# alone, then through Serve with the committed GPU configs and an ingress-count variant.
# On the GPU machine:  bash bench/device_run.sh bash bench/gpu_token_path.sh [NAME ...]
# NAMEs (default: offline pd colo): offline, pd (1P1D cuda_ipc), colo (colocated); the configs
# run two ingress replicas: pd_ing1 / colo_ing1 (one), pd_ing3 / colo_ing3 (three), pd_ing4 /
# colo_ing4 (four), pd_mps_ing3 / pd_mps_ing4 (pd_mps with three or four);
# pd_c50 / colo_c50 (stream_interval_ms: 50),
# <NAME>_gil<X> for NAME pd, colo or colo_fp8 (that config with the replicas' GIL switch interval
# at X ms, PDSERVE_GIL_SWITCH_MS; e.g. colo_gil1, colo_fp8_gil0.1),
# <NAME>_batch<N> for NAME pd, pd_mps, colo or colo_fp8 (that config sending up to N requests a Serve
# call, `submit_batch: N`: api/batched_submit.py; e.g. colo_batch32, colo_fp8_batch32),
# pd_noov / colo_noov (engine.overlap_scheduling: off), pd_proxy / colo_proxy (Serve's Python
# proxy instead of the HAProxy ingress: Ray is restarted without it, then with it again),
# pd_main / colo_main (the replicas run user code on Serve's own event loop:
# RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0, so an SSE event crosses no thread),
# pd_mps (1P1D with CUDA MPS: the two replicas' kernels run side by side on the GPU instead of
# in turns; Ray is restarted under an MPS control daemon, then without it again; the config's
# decode replica is an MPS client of below-normal priority, CUDA_MPS_CLIENT_PRIORITY=1),
# pd_mps_even (neither replica below normal), pd_mps_lowp (the prefill replica below normal
# instead), pd_mps_p60 (neither below normal, the prefill replica held to 60% of the SMs:
# CUDA_MPS_ACTIVE_THREAD_PERCENTAGE), pd_mps_c8k (its prompt chunks 8K tokens instead of 16K),
# pd_mps_pnoov (the prefill replica's overlapped scheduling off: the GPU has none of its work
# queued while it plans a step, so the decode replica's waiting kernels run there),
# pd_mps_pnoov_c8k (both),
# pd_mbox / colo_mbox (token_path: mailbox, the Ray mailbox actor, instead of the token socket),
# pd_fp8_mps (configs/llama3-8b-gpu-fp8.yaml under MPS; pd_fp8_mps_lowd: its decode replica
# below normal priority, as configs/llama3-8b-gpu.yaml runs it), colo_fp8 (the colocated
# config with fp8 weights and fp8 KV, as that file sets them: docs/fp8.md), offline_fp8 (the
# engine alone with both), lp_mps (long prompts, 2048 in / 16 out, 48 per Poisson rate in
# LP_RATES (default 16,24 req/s), SLOs TTFT <= 1 s and TPOT <= 20 ms: pd_mps_even against
# pd_mps, bench.compare), pd_local_mps (pd_mps with the decode replica prefilling prompts of up
# to 512 uncached tokens itself: here every prompt), sp_local_mps (a shared-prefix workload, 16
# groups of 16 requests, 1024-token prefix + 32-token suffix, 128 out, 64 at a time: pd_mps
# with `decode.local_prefill_max_tokens` 0 against 64, the config's, so that a request whose
# prefix the decode replica holds is prefilled there, bench.compare).
# With PDSERVE_STEP_LOG=DIR in the environment of bench/device_run.sh, every serving replica
# writes a line per engine step there (engine/step_log.py; Ray's workers inherit the variable
# from `ray start`), and DIR is copied to $OUT/steplog at the end.
set -u
C=configs/llama3-8b-gpu.yaml; K=configs/llama3-8b-gpu-colocated.yaml
python - "$C" "$K" <<'PY'
import sys, yaml
fp8_cfg = yaml.safe_load(open("configs/llama3-8b-gpu-fp8.yaml"))
fp8 = fp8_cfg["applications"][0]["args"]
low = {"env_vars": {"CUDA_MPS_CLIENT_PRIORITY": "1"}}  # an MPS client below normal priority
for src, name in zip(sys.argv[1:], ("pd_", "colo_")):  # /tmp/<NAME>.yaml
    cfg = yaml.safe_load(open(src))
    args = cfg["applications"][0]["args"]
    for n in (1, 3, 4):
        args["ingress"]["num_replicas"] = n
        yaml.safe_dump(cfg, open(f"/tmp/{name}ing{n}.yaml", "w"))
    args["ingress"]["num_replicas"] = 2
    args["stream_interval_ms"] = 50
    yaml.safe_dump(cfg, open(f"/tmp/{name}c50.yaml", "w"))
    args.pop("stream_interval_ms")
    env = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
    cfg["applications"][0]["runtime_env"] = {"env_vars": env}
    yaml.safe_dump(cfg, open(f"/tmp/{name}main.yaml", "w"))
    cfg["applications"][0].pop("runtime_env")
    args["engine"]["overlap_scheduling"] = "off"
    yaml.safe_dump(cfg, open(f"/tmp/{name}noov.yaml", "w"))
    args["engine"].pop("overlap_scheduling")
    args["token_path"] = "mailbox"
    yaml.safe_dump(cfg, open(f"/tmp/{name}mbox.yaml", "w"))
    args.pop("token_path")
    if name == "colo_":  # the fp8 settings of configs/llama3-8b-gpu-fp8.yaml
        args["model"]["quantize"] = fp8["model"]["quantize"]
        args["engine"]["kv_cache_dtype"] = fp8["engine"]["kv_cache_dtype"]
        yaml.safe_dump(cfg, open("/tmp/colo_fp8.yaml", "w"))
        args["model"].pop("quantize")
        args["engine"].pop("kv_cache_dtype")
    if name == "pd_":  # MPS variants; the config itself runs decode at below-normal priority
        yaml.safe_dump(cfg, open("/tmp/pd_mps.yaml", "w"))
        for n in (3, 4):
            args["ingress"]["num_replicas"] = n
            yaml.safe_dump(cfg, open(f"/tmp/pd_mps_ing{n}.yaml", "w"))
        args["ingress"]["num_replicas"] = 2
        configured = args["decode"].get("local_prefill_max_tokens", 0)
        for limit, out in ((512, "pd_local_mps"), (64, "pd_local64_mps"), (0, "pd_local0_mps")):
            args["decode"]["local_prefill_max_tokens"] = limit
            yaml.safe_dump(cfg, open(f"/tmp/{out}.yaml", "w"))
        args["decode"]["local_prefill_max_tokens"] = configured  # the variants below keep it
        decode_env = args["decode"]["ray_actor_options"].pop("runtime_env", None)
        yaml.safe_dump(cfg, open("/tmp/pd_mps_even.yaml", "w"))
        args["prefill"]["ray_actor_options"]["runtime_env"] = low
        yaml.safe_dump(cfg, open("/tmp/pd_mps_lowp.yaml", "w"))
        env = {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "60"}
        args["prefill"]["ray_actor_options"]["runtime_env"] = {"env_vars": env}
        yaml.safe_dump(cfg, open("/tmp/pd_mps_p60.yaml", "w"))
        args["prefill"]["ray_actor_options"].pop("runtime_env")
        if decode_env is not None:
            args["decode"]["ray_actor_options"]["runtime_env"] = decode_env
        chunk = args["prefill"]["engine"]["max_num_batched_tokens"]
        args["prefill"]["engine"]["max_num_batched_tokens"] = 8192
        yaml.safe_dump(cfg, open("/tmp/pd_mps_c8k.yaml", "w"))
        args["prefill"]["engine"]["overlap_scheduling"] = "off"
        yaml.safe_dump(cfg, open("/tmp/pd_mps_pnoov_c8k.yaml", "w"))
        args["prefill"]["engine"]["max_num_batched_tokens"] = chunk
        yaml.safe_dump(cfg, open("/tmp/pd_mps_pnoov.yaml", "w"))
fp8["decode"]["ray_actor_options"]["runtime_env"] = low  # the fp8 config, decode below normal
yaml.safe_dump(fp8_cfg, open("/tmp/pd_fp8_mps_lowd.yaml", "w"))
PY
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
for name in "${@:-offline pd colo}"; do
  for n in $name; do
    case $n in
      offline) timeout 240 python -m bench.gpu_offline --budgets 8192 --overlap on 2>&1 | tail -4 ;;
      offline_fp8) timeout 240 python -m bench.gpu_offline --budgets 8192 --overlap on --quantize fp8 \
                     --kv-cache-dtype fp8_e4m3 2>&1 | tail -6 ;;
      pd) bash bench/gpu_serve_runs.sh pd:$C ;;
      colo) bash bench/gpu_serve_runs.sh colo:$K ;;
      pd_proxy | colo_proxy)
        restart_ray 0
        if [ $n = pd_proxy ]; then cfg=$C; else cfg=$K; fi
        RAY_SERVE_ENABLE_HA_PROXY=0 bash bench/gpu_serve_runs.sh $n:$cfg
        restart_ray "${RAY_SERVE_ENABLE_HA_PROXY:-1}" ;;
      pd_mps | pd_mps_even | pd_mps_p60 | pd_mps_lowp | pd_mps_c8k | pd_local_mps | pd_mps_pnoov \
        | pd_mps_pnoov_c8k | pd_mps_ing3 | pd_mps_ing4 | pd_local0_mps | pd_local64_mps)
        if mps on; then bash bench/gpu_serve_runs.sh $n:/tmp/$n.yaml; mps off; fi ;;
      pd_fp8_mps)
        if mps on; then bash bench/gpu_serve_runs.sh $n:configs/llama3-8b-gpu-fp8.yaml; mps off; fi ;;
      pd_fp8_mps_lowd)
        if mps on; then bash bench/gpu_serve_runs.sh $n:/tmp/$n.yaml; mps off; fi ;;
      lp_mps)  # long prompts under MPS: goodput with the decode replica at normal, then below
        compare_under_mps lp_mps 560 14 /tmp/pd_mps_even.yaml /tmp/pd_mps.yaml \
          --labels normal,below --workload long-prompt --num-prompts 48 \
          --sweep-rates ${LP_RATES:-16,24} --slo-ttft-ms 1000 --slo-tpot-ms 20 ;;
      sp_local_mps)  # shared prefixes: every prompt remote, against local when cached
        compare_under_mps sp_local_mps 500 24 /tmp/pd_local0_mps.yaml /tmp/pd_local64_mps.yaml \
          --labels remote,local64 --workload shared-prefix --num-groups 16 --group-size 16 \
          --prefix-len 1024 --suffix-len 32 --output-len fixed:128 --concurrency 64 ;;
      *_gil*)
        base=${n%_gil*}
        case $base in pd) src=$C ;; colo) src=$K ;; *) src=/tmp/$base.yaml ;; esac
        python - "$src" "${n##*_gil}" /tmp/$n.yaml <<'PY'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["applications"][0]["runtime_env"] = {"env_vars": {"PDSERVE_GIL_SWITCH_MS": sys.argv[2]}}
yaml.safe_dump(cfg, open(sys.argv[3], "w"))
PY
        bash bench/gpu_serve_runs.sh $n:/tmp/$n.yaml ;;
      *_batch*)
        base=${n%_batch*}
        case $base in pd) src=$C ;; colo) src=$K ;; *) src=/tmp/$base.yaml ;; esac
        python - "$src" "${n##*_batch}" /tmp/$n.yaml <<'PY'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
cfg["applications"][0]["args"]["submit_batch"] = int(sys.argv[2])
yaml.safe_dump(cfg, open(sys.argv[3], "w"))
PY
        case $base in
          pd_mps) if mps on; then bash bench/gpu_serve_runs.sh $n:/tmp/$n.yaml; mps off; fi ;;
          *) bash bench/gpu_serve_runs.sh $n:/tmp/$n.yaml ;;
        esac ;;
      pd_* | colo_*)  # a variant the script wrote above
        if [ -f /tmp/$n.yaml ]; then bash bench/gpu_serve_runs.sh $n:/tmp/$n.yaml
        else echo "unknown name $n"; fi ;;
      *) echo "unknown name $n" ;;
    esac
  done
done
if [ -n "${PDSERVE_STEP_LOG:-}" ] && [ -d "$PDSERVE_STEP_LOG" ] && [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/steplog" && cp -r "$PDSERVE_STEP_LOG"/. "$OUT/steplog/"
fi
