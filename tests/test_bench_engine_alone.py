"""`bench.engine_alone`: the serving role's engine of a config, on bench.cpu_cluster's workload."""

from __future__ import annotations

from pathlib import Path

import yaml

from bench.config_variant import variant
from bench.engine_alone import build_llm, measure

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_the_serving_roles_engine_runs_one_prompt_at_a_time_then_waves(tmp_path: Path,
                                                                       tiny_llama: str) -> None:
    config = variant(yaml.safe_load(TINY.read_text()),
                     [f"model.path={tiny_llama}", "decode.engine={max_num_batched_tokens: 96}",
                      "prefill.engine={max_num_batched_tokens: 200}"])
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    llm = build_llm(path)
    # decode is the role the ingress calls in disaggregated mode: its override, not prefill's
    assert llm.engine.cfg.max_num_batched_tokens == 96
    assert (llm.engine.cfg.page_size, llm.engine.cfg.num_pages) == (16, 1024)
    assert llm.engine.model_cfg.path == tiny_llama
    one, many = measure(llm, input_len=5, output_len=3, single=2, concurrency=3, waves=2)
    assert (one.prompts, one.output_tokens) == (2, 6)
    assert (many.prompts, many.output_tokens) == (6, 18)
    assert one.seconds > 0 and many.seconds > 0
    assert not llm.engine.has_unfinished()
    llm.engine.check_integrity()
