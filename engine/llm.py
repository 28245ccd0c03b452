"""In-process LLM for tests and benchmarks: `LLM(model_dir).generate(prompts, params)`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from engine.config import EngineConfig, ModelConfig, default_model_dir
from engine.llm_engine import Engine
from engine.outputs import RequestOutput, TokenLogprob
from engine.sampling_params import SamplingParams

_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"path"}
_ENGINE_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


@dataclass
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


class LLM:
    """Keyword arguments go to ModelConfig (dtype, device, load_format, seed) or EngineConfig."""

    def __init__(self, model: str | Path | None = None, **kwargs) -> None:
        unknown = set(kwargs) - _MODEL_FIELDS - _ENGINE_FIELDS
        if unknown:
            raise TypeError(f"unknown LLM arguments: {sorted(unknown)}")
        path = str(model or default_model_dir())
        model_cfg = ModelConfig(path, **{k: v for k, v in kwargs.items() if k in _MODEL_FIELDS})
        engine_cfg = EngineConfig(**{k: v for k, v in kwargs.items() if k in _ENGINE_FIELDS})
        self.engine = Engine(model_cfg, engine_cfg)
        self.tokenizer = self.engine.tokenizer

    # The step-wise API: add requests at any time, step, read outputs.
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        return self.engine.add_request(prompt, params, request_id)

    def step(self) -> list[RequestOutput]:
        return self.engine.step()

    def abort(self, request_id: str) -> bool:
        return self.engine.abort(request_id)

    def generate(self, prompts: str | list[int] | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[Completion]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(params, list):
            params = [params or SamplingParams()] * len(prompts)
        done: dict[str, Completion] = {}
        order = []
        for prompt, p in zip(prompts, params):
            prompt_ids = self.engine.tokenize(prompt)
            rid = self.add_request(prompt_ids, p)
            order.append(rid)
            done[rid] = Completion(rid, prompt_ids)
        while self.engine.has_unfinished():
            for out in self.step():
                c = done[out.request_id]
                c.token_ids += out.new_token_ids
                c.text += out.new_text
                c.logprobs += out.new_logprobs
                c.finish_reason = out.finish_reason
        return [done[rid] for rid in order]
