"""The Serve configs that bench/gpu_token_path.sh measures beside the committed GPU configs: each
variant is a base config and the settings it changes (bench.config_variant.with_settings; a key
starting with "/" is on the application, not under its args).

python -m bench.gpu_variants NAME [NAME ...] --out-dir /tmp     # writes /tmp/NAME.yaml each
python -m bench.gpu_variants --list

Besides the names in `VARIANTS`, two families are made on the fly from any base B (pd, colo, or
a variant's name): `B_gil<X>` (every replica's GIL switch interval at X ms, PDSERVE_GIL_SWITCH_MS)
and `B_batch<N>` (the ingress sending up to N requests a Serve call, `submit_batch`). The script
runs a name containing "_mps" under a CUDA MPS daemon.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from bench.config_variant import DROP, with_settings

PD = "configs/llama3-8b-gpu.yaml"  # 1P1D on one GPU; its decode replica below normal MPS priority
COLO = "configs/llama3-8b-gpu-colocated.yaml"
FP8 = "configs/llama3-8b-gpu-fp8.yaml"
BASES = {"pd": PD, "colo": COLO}
LOW = {"env_vars": {"CUDA_MPS_CLIENT_PRIORITY": "1"}}  # an MPS client below normal priority
DECODE_ENV = "decode.ray_actor_options.runtime_env"
PREFILL_ENV = "prefill.ray_actor_options.runtime_env"


def _both(prefix: str, base: str) -> dict[str, tuple[str, dict[str, Any]]]:
    """The variants made of either config: ingress count, coalescing, threads, token path."""
    out: dict[str, tuple[str, dict[str, Any]]] = {
        f"{prefix}_ing{n}": (base, {"ingress.num_replicas": n}) for n in (1, 3, 4)}
    out[f"{prefix}_c50"] = (base, {"stream_interval_ms": 50})
    # user code on Serve's own event loop, so an SSE event crosses no thread
    main_loop = {"env_vars": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}}
    out[f"{prefix}_main"] = (base, {"/runtime_env": main_loop})
    out[f"{prefix}_noov"] = (base, {"engine.overlap_scheduling": "off"})
    out[f"{prefix}_mbox"] = (base, {"token_path": "mailbox"})  # the Ray mailbox actor
    return out


VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **_both("pd", PD),
    **_both("colo", COLO),
    # the colocated config with fp8 weights and fp8 KV, as the fp8 config sets them
    "colo_fp8": (COLO, {"model.quantize": "fp8", "engine.kv_cache_dtype": "fp8_e4m3"}),
    # 1P1D under MPS (the config as committed) and its variants
    "pd_mps": (PD, {}),
    "pd_mps_ing3": (PD, {"ingress.num_replicas": 3}),
    "pd_mps_ing4": (PD, {"ingress.num_replicas": 4}),
    "pd_mps_even": (PD, {DECODE_ENV: DROP}),  # neither replica below normal priority
    "pd_mps_lowp": (PD, {DECODE_ENV: DROP, PREFILL_ENV: LOW}),  # the prefill below instead
    "pd_mps_p60": (PD, {DECODE_ENV: DROP,  # neither below, the prefill held to 60% of the SMs
                        PREFILL_ENV: {"env_vars": {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "60"}}}),
    "pd_mps_c8k": (PD, {"prefill.engine.max_num_batched_tokens": 8192}),
    # the prefill's overlapped scheduling off: none of its work is queued on the GPU while it
    # plans a step, so the decode replica's waiting kernels run there
    "pd_mps_pnoov": (PD, {"prefill.engine.overlap_scheduling": "off"}),
    "pd_mps_pnoov_c8k": (PD, {"prefill.engine.overlap_scheduling": "off",
                              "prefill.engine.max_num_batched_tokens": 8192}),
    # the decode replica prefilling prompts of up to N uncached tokens itself (512: every
    # prompt of the token-path workload; 64: the config's; 0: none)
    "pd_local_mps": (PD, {"decode.local_prefill_max_tokens": 512}),
    "pd_local64_mps": (PD, {"decode.local_prefill_max_tokens": 64}),
    "pd_local0_mps": (PD, {"decode.local_prefill_max_tokens": 0}),
    # a Serve call per prompt from the decode replica to the prefill replica, as before
    # `decode.prefill_batch` (the config's default sends up to 32 a call)
    "pd_mps_pb1": (PD, {"decode.prefill_batch": 1}),
    # decode steps held (at most N ms) while the prompts on their way would double the batch
    # (engine/decode_hold.py)
    **{f"pd_mps_hold{n}": (PD, {"decode.engine.decode_hold_ms": n}) for n in (250, 1000)},
    # the fp8 config with its decode replica below normal priority, as PD runs it
    "pd_fp8_mps_lowd": (FP8, {DECODE_ENV: LOW}),
}


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """(base config path, settings) of `name`; KeyError for a name that is no variant."""
    if name in VARIANTS:
        return VARIANTS[name]
    if m := re.fullmatch(r"(.+)_gil([0-9.]+)", name):
        base, settings = _base(m[1])
        return base, {**settings, "/runtime_env": {"env_vars": {"PDSERVE_GIL_SWITCH_MS": m[2]}}}
    if m := re.fullmatch(r"(.+)_batch([0-9]+)", name):
        base, settings = _base(m[1])
        return base, {**settings, "submit_batch": int(m[2])}
    raise KeyError(name)


def _base(name: str) -> tuple[str, dict[str, Any]]:
    return (BASES[name], {}) if name in BASES else resolve(name)


def write(name: str, out_dir: Path) -> Path:
    base, settings = resolve(name)
    cfg = with_settings(yaml.safe_load(Path(base).read_text()), settings)
    path = out_dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*")
    ap.add_argument("--out-dir", default="/tmp")
    ap.add_argument("--list", action="store_true", help="print the fixed variants' names")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(VARIANTS))
        return
    for name in args.names:
        try:
            print(write(name, Path(args.out_dir)))
        except KeyError:
            sys.exit(f"unknown variant {name!r}; fixed ones: {', '.join(VARIANTS)}; or "
                     "<BASE>_gil<X>, <BASE>_batch<N>")


if __name__ == "__main__":
    main()
