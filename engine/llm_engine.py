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

from engine.attention.registry import make_backend
from engine.block_allocator import BlockAllocator
from engine.block_hash import block_hashes
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


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot load the tokenizer: {e}") from e


class Engine:
    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig) -> None:
        self.model_cfg, self.cfg = model_cfg, engine_cfg
        self.arch = arch = ModelArch.from_pretrained(model_cfg.path)
        self.max_model_len = self.max_model_len_for(arch, engine_cfg)
        # Random weights sample ids the tokenizer may not know (a shape-only model directory
        # can carry any tokenizer): with dummy weights the engine streams token ids, no text.
        self.tokenizer = (None if model_cfg.load_format == "dummy"
                          else load_tokenizer(model_cfg.path))
        self.device = torch.device(model_cfg.device)
        self.model = load_model(model_cfg, arch, self.max_model_len)
        dtype = getattr(torch, model_cfg.dtype)
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
        self.held: dict[str, Request] = {}  # finished, pages kept for export
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._ids = itertools.count()
        backend.warmup()

    # -- set-up ---------------------------------------------------------------------------
    @staticmethod
    def max_model_len_for(arch: ModelArch, cfg: EngineConfig) -> int:
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
                    request_id: str | None = None, hold_kv: bool = False) -> str:
        """Queue a request. With `hold_kv` its pages outlive it until `release()` (prefill role)."""
        params = params or SamplingParams()
        prompt_ids = self.tokenize(prompt)
        self.validate(prompt_ids, params)
        req = Request(request_id or f"req-{next(self._ids)}", prompt_ids, params, hold_kv=hold_kv)
        self._register(req)
        self.scheduler.add(req)
        return req.request_id

    def _register(self, req: Request) -> None:
        if req.request_id in self.requests or req.request_id in self.held:
            raise ValueError(f"request id {req.request_id!r} is already running")
        self.requests[req.request_id] = req
        if self.tokenizer is not None:
            self.detokenizers[req.request_id] = IncrementalDetokenizer(
                self.tokenizer, req.prompt_token_ids, req.params)

    # -- the prefill role: pages outlive the request until exported ------------------------
    def export_kv(self, request_id: str, first_block: int = 0):
        """KV of a held request's pages from `first_block` on, and all its full-block hashes."""
        req = self.held[request_id]
        n_pages = -(-req.num_prompt_tokens // self.cfg.page_size)
        data = self.pool.read_pages(req.block_table[first_block:n_pages])
        return data, block_hashes(req.prompt_token_ids, self.cfg.page_size, req.block_hashes)

    def release(self, request_id: str) -> None:
        req = self.held.pop(request_id, None)
        if req is not None:
            self.scheduler.release(req)

    # -- the decode role: admit a request whose prompt KV comes from elsewhere -------------
    def reserve(self, req: Request) -> int | None:
        """Pages for req's prompt: cached prefix pages first, fresh pages for the rest.

        Returns how many leading blocks were found in the prefix cache (they need no transfer),
        or None when the pool cannot hold the prompt now (nothing is kept then).
        """
        ps = self.cfg.page_size
        req.block_hashes = block_hashes(req.prompt_token_ids, ps)
        cached = self.allocator.match_prefix(req.block_hashes) if self.cfg.enable_prefix_caching \
            else []
        missing = -(-req.num_prompt_tokens // ps) - len(cached)
        if not self.allocator.can_allocate(missing):
            self.allocator.free(cached)
            return None
        req.block_table = cached + self.allocator.allocate(missing)
        req.num_cached_tokens = len(cached) * ps
        return len(cached)

    def unreserve(self, req: Request) -> None:
        self.scheduler.release(req)

    def import_kv(self, req: Request, first_block: int, data) -> None:
        """Write transferred pages into req's reserved pages from `first_block` on."""
        self.pool.write_pages(req.block_table[first_block:], data)
        req.num_computed_tokens = req.num_prompt_tokens
        if self.cfg.enable_prefix_caching:
            for i in range(first_block, req.num_prompt_tokens // self.cfg.page_size):
                self.allocator.register(req.block_table[i], req.block_hashes[i])

    def admit_prefilled(self, req: Request, first_token: int, logprob=None) -> RequestOutput:
        """Join the running batch with the first token that the prefill side sampled."""
        self._register(req)
        req.output_token_ids.append(first_token)
        req.output_logprobs.append(logprob)
        reason = self.scheduler.stop_reason(req, first_token)
        if reason:
            self.scheduler.finish(req, reason)
        else:
            self.scheduler.add_running(req)
        return self._output(req)

    def abort(self, request_id: str) -> bool:
        self.release(request_id)
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
            if req.hold_kv and req.block_table:
                self.held[req.request_id] = req
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
