"""The engine: tokenizer + scheduler + model runner, stepped one iteration at a time.

    batch = scheduler.schedule(); out = runner.execute(batch); scheduler.update(batch, out)

plus detokenization and stop strings on the way out. Both the prefill and the decode roles
drive one of these; `LLM` (engine/llm.py) wraps it for in-process use.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch

from engine.attention import make_backend
from engine.block_allocator import BlockAllocator
from engine.config import EngineConfig, ModelConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_pool import KVPool
from engine.loader import load_model
from engine.model_arch import ModelArch
from engine.model_runner import ModelRunner
from engine.outputs import RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

log = logging.getLogger(__name__)


def load_tokenizer(path: str | Path, required: bool = True):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        if required:
            raise ValueError(f"{path}: cannot load the tokenizer: {e}") from e
        return None


class Engine:
    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig) -> None:
        self.model_cfg, self.cfg = model_cfg, engine_cfg
        self.arch = arch = ModelArch.from_pretrained(model_cfg.path)
        self.max_model_len = self._max_model_len(arch, engine_cfg)
        self.tokenizer = load_tokenizer(model_cfg.path, model_cfg.load_format != "dummy")
        self.device = torch.device(model_cfg.device)
        self.model = load_model(model_cfg, arch, self.max_model_len)
        dtype = model_cfg.torch_dtype
        num_pages = engine_cfg.num_pages or self._auto_num_pages(dtype)
        self.pool = KVPool(arch, num_pages, engine_cfg.page_size, dtype, self.device)
        self.allocator = BlockAllocator(num_pages, engine_cfg.page_size)
        backend = make_backend(engine_cfg.attention_backend, num_q_heads=arch.num_heads,
                               num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                               dtype=dtype, device=self.device, page_size=engine_cfg.page_size,
                               max_num_seqs=engine_cfg.max_num_seqs)
        self.runner = ModelRunner(self.model, self.pool, backend, engine_cfg, self.device)
        self.scheduler = Scheduler(engine_cfg, self.allocator, self.max_model_len,
                                   arch.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        backend.warmup()

    # -- set-up ---------------------------------------------------------------------------
    @staticmethod
    def _max_model_len(arch: ModelArch, cfg: EngineConfig) -> int:
        limit = arch.max_position_embeddings
        if arch.sliding_window:
            # Attention here is full, not windowed: stay where the two are the same.
            limit = min(limit, arch.sliding_window)
        if cfg.max_model_len is not None and cfg.max_model_len > limit:
            raise ValueError(f"max_model_len {cfg.max_model_len} exceeds the model's limit {limit}")
        return cfg.max_model_len or limit

    def _auto_num_pages(self, dtype: torch.dtype) -> int:
        per_page = KVPool.bytes_per_page(self.arch, self.cfg.page_size, dtype)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.cfg.kv_memory_fraction
        else:
            budget = self.cfg.kv_memory_gb * 2**30
        return max(1, int(budget // per_page))

    # -- requests -------------------------------------------------------------------------
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: send prompts as token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens but this model allows at "
                             f"most {self.max_model_len} tokens in all (prompt + output)")
        bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < self.arch.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]!r} is outside the vocabulary "
                             f"[0, {self.arch.vocab_size})")
        params.validate()
        total = min(len(prompt_ids) + params.max_tokens, self.max_model_len)
        if -(-total // self.cfg.page_size) > self.allocator.num_pages:
            raise ValueError(f"a request of {total} tokens does not fit the KV pool "
                             f"({self.allocator.num_pages} pages of {self.cfg.page_size})")

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        prompt_ids = self.tokenize(prompt)
        self.validate(prompt_ids, params)
        req = Request(request_id or f"req-{next(self._ids)}", prompt_ids, params)
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already running")
        self.requests[req.request_id] = req
        if self.tokenizer is not None:
            self.detokenizers[req.request_id] = IncrementalDetokenizer(
                self.tokenizer, prompt_ids, params)
        self.scheduler.add(req)
        return req.request_id

    def abort(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        self.detokenizers.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        out = self.runner.execute(batch)
        changed = self.scheduler.update(batch, out)
        return [self._output(req) for req in changed]

    def _output(self, req: Request) -> RequestOutput:
        tok = req.output_token_ids[-1]
        detok = self.detokenizers.get(req.request_id)
        text = ""
        if detok is not None:
            text = detok.push([tok])
            if detok.finished_by_stop and not req.finished:
                self.scheduler.finish(req, "stop")
            elif req.finished:
                text += detok.flush()
        if req.finished:
            self.requests.pop(req.request_id, None)
            self.detokenizers.pop(req.request_id, None)
        lp = req.output_logprobs[-1]
        return RequestOutput(
            request_id=req.request_id, new_token_ids=[tok], new_text=text,
            finished=req.finished, finish_reason=req.finish_reason,
            new_logprobs=[lp] if lp is not None else [],
            num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens)

    @property
    def num_pages_used(self) -> int:
        """Pages referenced by requests (cached-but-unused prefix pages do not count)."""
        return self.allocator.num_used
