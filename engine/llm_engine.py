"""The engine: tokenizer + scheduler + model runner, stepped one iteration at a time.

    batch = scheduler.schedule(); out = runner.execute(batch); scheduler.update(batch, out)

With overlapped scheduling (`overlap_scheduling`, on for CUDA by default) execute splits in two:
the step is launched, the scheduler counts it at once (`scheduler.launch`), and the previous
step's tokens are collected and applied while it runs, so one call of `step` returns the outputs
of the step launched by the call before. The tokens are the same as without overlap.

plus, with `detokenize=True`, text and stop strings on the way out. `LLM` (engine/llm.py, in
process) detokenizes here; the serving replicas (prefill and decode roles) do not: there the
API detokenizes (api/detokenizing_client.py), off the step loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from pathlib import Path

import torch

from engine.attention.registry import make_backend
from engine.batch import ScheduledBatch
from engine.block_allocator import BlockAllocator
from engine.config import EngineConfig, ModelConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.hop_log import hop
from engine.kv_export import KVExporter
from engine.kv_pool import KVPool
from engine.kv_stream import LayerwiseExport
from engine.loader import load_model
from engine.metrics import EngineStats
from engine.model_arch import ModelArch
from engine.model_runner import LaunchedStep, ModelRunner, StepOutput
from engine.outputs import RequestOutput
from engine.page_import import page_import
from engine.request import Request
from engine.request_limits import RequestLimits
from engine.sampling_params import SamplingParams
from engine.scheduler import Reservation, Scheduler

log = logging.getLogger(__name__)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot load the tokenizer: {e}") from e


class Engine:
    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig,
                 detokenize: bool = True) -> None:
        """`detokenize=False`: outputs carry token ids only (`new_text == ""`) and stop strings
        are left to whoever detokenizes; stop token ids, EOS and max_tokens still end requests
        here. Decoding every token inside the step holds the GIL the step loop needs."""
        self.model_cfg, self.cfg = model_cfg, engine_cfg
        self.detokenize = detokenize
        self.arch = arch = ModelArch.from_pretrained(model_cfg.path)
        self.max_model_len = RequestLimits.max_model_len_for(arch, engine_cfg)
        # Random weights sample ids the tokenizer may not know (a shape-only model directory
        # can carry any tokenizer): with dummy weights the engine streams token ids, no text.
        self.tokenizer = (None if model_cfg.load_format == "dummy"
                          else load_tokenizer(model_cfg.path))
        self.device = torch.device(model_cfg.device)
        self.model = load_model(model_cfg, arch, self.max_model_len)
        dtype = getattr(torch, model_cfg.dtype)
        kv_dtype = getattr(torch, engine_cfg.kv_dtype_name(model_cfg.dtype))  # fp8 or dtype
        num_pages = engine_cfg.num_pages or self._auto_num_pages(kv_dtype)
        self.pool = KVPool(arch, num_pages, engine_cfg.page_size, kv_dtype, self.device)
        backend = make_backend(engine_cfg.attention_backend, num_q_heads=arch.num_heads,
                               num_kv_heads=arch.num_kv_heads, head_dim=arch.head_dim,
                               dtype=dtype, device=self.device, page_size=engine_cfg.page_size,
                               max_num_seqs=engine_cfg.max_num_seqs, kv_dtype=kv_dtype)
        self.runner = ModelRunner(self.model, self.pool, backend, engine_cfg, self.device)
        self.scheduler = Scheduler(engine_cfg, BlockAllocator(num_pages, engine_cfg.page_size),
                                   self.max_model_len, arch.eos_token_ids)
        self.limits = RequestLimits(arch.vocab_size, self.max_model_len, engine_cfg.page_size,
                                    self.scheduler.kv.num_pages)
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        # Reservations a transport may be writing into (their PageImport is out), each with
        # whether an abort came meanwhile: their pages are freed only at `end_import`.
        self.importing: dict[str, bool] = {}
        self._ids = itertools.count()
        self.overlap = (engine_cfg.overlap_scheduling == "on"
                        or engine_cfg.overlap_scheduling == "auto" and self.device.type == "cuda")
        self._in_flight: tuple[ScheduledBatch, LaunchedStep] | None = None
        self.step_device_s: float | None = None
        # The prefill role's exports, read out on a stream of their own (engine/kv_export.py).
        self.exporter = KVExporter(self.pool)
        backend.warmup()

    # -- set-up ---------------------------------------------------------------------------
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
        """ValueError if the request cannot run here (engine/request_limits.py)."""
        self.limits.validate(prompt_ids, params)

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, kv_export_from: int | None = None,
                    kv_stream: LayerwiseExport | None = None) -> str:
        """Queue a request. With `kv_export_from` (the prefill role) its finishing output carries
        the KV of its prompt's pages from that block on (`RequestOutput.kv`); with `kv_stream`
        too, those pages are also published layer by layer as its last prompt step runs."""
        params = params or SamplingParams()
        prompt_ids = self.tokenize(prompt)
        self.validate(prompt_ids, params)
        if kv_stream is not None and kv_export_from is None:
            raise ValueError("kv_stream needs kv_export_from")
        req = Request(request_id or f"req-{next(self._ids)}", prompt_ids, params,
                      kv_export_from=kv_export_from, kv_stream=kv_stream)
        self.scheduler.add(req)
        self._open_detokenizer(req)
        hop(req.request_id, "engine.add")
        return req.request_id

    def _open_detokenizer(self, req: Request) -> None:
        if self.detokenize and self.tokenizer is not None:
            self.detokenizers[req.request_id] = IncrementalDetokenizer(
                self.tokenizer, req.prompt_token_ids, req.params)

    # -- the decode role: admit a request whose prompt KV comes from elsewhere -------------
    def reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                hashes: list[int] | None = None) -> Reservation | None:
        """Pages for a prompt whose KV another replica computes: cached prefix pages first, fresh
        pages for the rest; None when the pool cannot hold it now. Undo with `abort`. On a
        GPU the reservation carries a PageImport (`import_to`), and an abort of it is carried
        out only at `end_import`, which its receiver calls once no transport writes there.
        `hashes`: the chain hashes of the prompt's full blocks (engine/block_hash.py) where the
        caller has them already; they are not computed again."""
        self.validate(prompt_ids, params)
        rsv = self.scheduler.reserve(Request(request_id, list(prompt_ids), params,
                                             block_hashes=list(hashes or ())))
        if rsv is None:
            return None
        hop(request_id, "engine.reserve")
        pages = self.scheduler.reserved[request_id].block_table[rsv.first_block:]
        target = page_import(self.pool, pages)
        if target is not None:
            self.importing[request_id] = False
        return dataclasses.replace(rsv, import_to=target)

    def end_import(self, request_id: str) -> None:
        """No transport writes into request_id's reserved pages any more (its receive ended,
        or never started). An abort that came while one might have is carried out now; until
        then the pages stay reserved, so that no other request gets them mid-write."""
        if self.importing.pop(request_id, False):
            self.abort(request_id)

    def admit_prefilled(self, request_id: str, first_block: int, data, first_token: int,
                        logprob=None, num_cached_tokens: int = 0,
                        prompt_logprobs: list | None = None) -> RequestOutput | None:
        """Write the transferred pages (blocks >= first_block) into the reservation (unless `data`
        is None: a transport wrote them through the reservation's `import_to`), then join
        the running batch with the first token (and the prompt logprobs, if asked for) that the
        prefill side computed. On any error the reservation is freed. None if the reservation is
        gone: the request was aborted while its KV was on the way (its client or its token
        mailbox went)."""
        req = self.scheduler.reserved.get(request_id)
        if req is None:
            return None
        if req.params.prompt_logprobs is not None:
            if prompt_logprobs is None or len(prompt_logprobs) != req.num_prompt_tokens:
                self.scheduler.abort(request_id)
                raise ValueError(f"{request_id}: the prefill side sent no prompt logprobs")
            # Complete now, so a preemption's recompute here never computes them again.
            req.prompt_logprobs = list(prompt_logprobs)
        try:
            if data is not None:  # None: the transport wrote them (engine/page_import.py)
                self.pool.write_pages(req.block_table[first_block:], data)
            self.scheduler.import_done(req, first_block)
        except BaseException:
            self.scheduler.abort(request_id)
            raise
        req.num_cached_tokens = max(req.num_cached_tokens, num_cached_tokens)
        self.scheduler.admit(req, first_token, logprob)
        self._open_detokenizer(req)
        hop(request_id, "engine.admit")
        return self._output(req)

    def abort(self, request_id: str) -> bool:
        self.detokenizers.pop(request_id, None)
        if request_id in self.importing:  # freed at end_import: a transport may be writing
            self.importing[request_id] = True
            return True
        req = self.scheduler.abort(request_id)
        if req is not None and isinstance(req.kv_stream, LayerwiseExport):
            req.kv_stream.fail(f"request {request_id} was aborted")
        return req is not None

    def held_s(self) -> float:
        """Seconds for which a step would launch nothing and collect nothing: a decode hold
        (engine/decode_hold.py) with no step in flight; 0 otherwise."""
        return 0.0 if self._in_flight is not None else self.scheduler.hold_s()

    def has_unfinished(self) -> bool:
        # A request with a step in flight is still waiting or running until that step's update;
        # a step in flight for finished (aborted) requests only is collected by the next step.
        return self.scheduler.has_unfinished()

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = self._step()
        # the device time of the steps that ended since the last call (runner.time_steps)
        self.step_device_s = self.runner.device_seconds() if self.runner.time_steps else None
        return outputs

    def _step(self) -> list[RequestOutput]:
        if not self.overlap:
            outputs = self._collect()  # a step launched while overlap was on
            batch = self.scheduler.schedule()
            return outputs + self._apply(batch, self.runner.execute(batch))
        batch = self.scheduler.schedule()  # planned while the step in flight (if any) runs
        outputs: list[RequestOutput] = []
        if self._in_flight is not None and self._needs_known_tokens(batch):
            outputs = self._collect()
            batch.drop_finished()
        launched = self.runner.launch(batch) if batch.requests else None
        if launched is not None:
            self.scheduler.launch(batch)
        outputs += self._collect()  # the step before this one, if any
        if launched is not None:
            self._in_flight = (batch, launched)
            if launched.collect_now:
                outputs += self._collect()
        return outputs

    def _needs_known_tokens(self, batch: ScheduledBatch) -> bool:
        """A repetition penalty reads every earlier token, so its request's pending token must
        be on the host before its next step is launched."""
        return any(r.num_output_placeholders and r.params.repetition_penalty != 1.0
                   for r in batch.requests)

    def _collect(self) -> list[RequestOutput]:
        if self._in_flight is None:
            return []
        batch, launched = self._in_flight
        self._in_flight = None
        return self._apply(batch, launched.result())

    def _apply(self, batch: ScheduledBatch, out: StepOutput) -> list[RequestOutput]:
        for req, lps in out.prompt_logprobs.items():
            req.prompt_logprobs += lps
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
        kv = None
        if req.finished:
            self.detokenizers.pop(req.request_id, None)
            if req.request_id in self.scheduler.exporting:
                try:
                    kv = self.exporter.export(req)
                finally:
                    self.scheduler.release(req)  # the pages go back now
        lp = req.output_logprobs[-1]
        # The prompt's logprobs ride on the first output (complete by then: the last prompt
        # step, which scores them all, is the one that samples the first token).
        prompt_lps = (list(req.prompt_logprobs) if len(req.output_token_ids) == 1
                      and req.params.prompt_logprobs is not None else None)
        return RequestOutput(
            request_id=req.request_id, new_token_ids=[tok], new_text=text,
            finished=req.finished, finish_reason=req.finish_reason,
            new_logprobs=[lp] if lp is not None else [],
            num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens, kv=kv, prompt_logprobs=prompt_lps)

    # -- state ----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        kv, sched = self.scheduler.kv, self.scheduler
        return EngineStats(
            pages_total=kv.num_pages, pages_used=kv.num_used, pages_cached=kv.num_cached,
            num_running=len(sched.running), num_waiting=len(sched.waiting),
            num_preemptions=sched.num_preemptions,
            num_cascade_steps=self.runner.num_cascade_steps,
            num_cascade_tokens=self.runner.num_cascade_tokens,
            num_prefill_tokens=sched.num_prefill_tokens,
            num_prefill_steps=sched.num_prefill_steps,
            num_decode_tokens=sched.num_decode_tokens)

    def check_integrity(self) -> None:
        """Raises AssertionError if the page accounting is broken (call between steps)."""
        self.scheduler.check_integrity()

    @property
    def allocator(self):
        """The page allocator, to read (tests, benchmarks); only the scheduler changes it."""
        return self.scheduler.kv.allocator

    @property
    def export_stream(self) -> torch.cuda.Stream | None:
        """The CUDA stream exports are read out on (None off CUDA): a transport sends on it."""
        return self.exporter.stream

    @property
    def num_pages_used(self) -> int:
        """Pages referenced by requests (cached-but-unused prefix pages do not count)."""
        return self.scheduler.kv.num_used
