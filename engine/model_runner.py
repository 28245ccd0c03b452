"""Runs one scheduled batch through the model: inputs, attention plan, forward, sampling.

`launch(batch)` queues the step on the device and returns a `LaunchedStep` whose `result()`
waits for its tokens; `execute(batch)` is the two at once. Between the two the host may plan
and launch the next step (overlapped scheduling): a request whose last input token is one the
step in flight is sampling reads it from that step's device tensor, so no id crosses to the
host and back before the next step can start.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from engine.attention.base import AttentionBackend
from engine.attention.cascade import plan_cascade
from engine.attention.metadata import build_metadata
from engine.batch import ModelOutput, ScheduledBatch
from engine.block_table import BlockTableMirror
from engine.config import EngineConfig
from engine.fp8_fusion import fusable
from engine.fp8_linear import ROWWISE_MIN_M
from engine.host_copy import to_device_async
from engine.kv_pool import KVPool
from engine.kv_stream import LayerExporter
from engine.model import CausalLM
from engine.outputs import TokenLogprob
from engine.prompt_logprobs import PromptLogprobs
from engine.request import Request
from engine.sampler import PendingSample, Sampler


@dataclass
class StepOutput(ModelOutput):
    """ModelOutput plus the prompt logprobs the step computed: new entries of each request's
    `prompt_logprobs` (engine/prompt_logprobs.py), which the engine appends."""

    prompt_logprobs: dict[Request, list[TokenLogprob | None]] = field(default_factory=dict)


@dataclass
class LaunchedStep:
    """A step queued on the device. `result()` waits for its sampled tokens (once)."""

    batch_size: int
    rows: list[int]  # batch index of each sampled row of `pending`
    pending: PendingSample | None
    prompt_logprobs: dict[Request, list[TokenLogprob | None]]
    # The engine collects this step before launching another: it computed prompt logprobs (the
    # host already waited for them) or exported KV layer by layer.
    collect_now: bool

    def result(self) -> StepOutput:
        token_ids: list[int | None] = [None] * self.batch_size
        logprobs: list = [None] * self.batch_size
        if self.pending is not None:
            out = self.pending.result()
            for i, tok, lp in zip(self.rows, out.token_ids, out.logprobs, strict=True):
                token_ids[i] = tok
                logprobs[i] = lp
        return StepOutput(token_ids, logprobs, self.prompt_logprobs)


class ModelRunner:
    def __init__(self, model: CausalLM, pool: KVPool, backend: AttentionBackend,
                 cfg: EngineConfig, device: torch.device) -> None:
        self.model = model
        self.pool = pool
        self.backend = backend
        self.cfg = cfg
        self.device = device
        self.sampler = Sampler()
        self.prompt_logprobs = PromptLogprobs(model, pool, backend, device)
        self.num_cascade_steps = 0
        self.num_cascade_tokens = 0
        self.block_tables = BlockTableMirror()  # numpy rows of the scheduled requests' pages
        self.graphs = None  # decode-only steps replay CUDA graphs (GPU + cuda_graphs only)
        # The last launched step's sampled ids on the device, and each sampling request's row.
        self._sampled: tuple[dict[Request, int], torch.Tensor] | None = None
        self._planned = None  # a CUDA event after the last step's attention plan
        # Time each step on the device (CUDA: two timing events a step, microseconds against
        # steps of milliseconds): from just before its forward is queued to its sampled ids, so
        # a GPU left idle before the step (the host planning it) does not count, and one left
        # waiting for an eager forward's kernel launches does. For /metrics and the step log.
        self.time_steps = device.type == "cuda"
        self._timings: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque()
        if cfg.cuda_graphs and device.type == "cuda":
            from engine.cuda_graph import CudaGraphRunner

            self.graphs = CudaGraphRunner(model, pool, backend, cfg.max_num_seqs, device,
                                          cascade_graphs=cfg.cascade != "off")
        if device.type == "cuda" and any(fusable(layer) for layer in model.layers):
            self.warm_up_rowwise_fp8()

    @torch.inference_mode()
    def warm_up_rowwise_fp8(self) -> bool:
        """One eager forward of `ROWWISE_MIN_M` prompt tokens, at start-up: fused fp8 layers
        (engine/fp8_fusion.py) take other compiled kernels from that many rows on (the row-wise
        GEMM's output arrives scaled), and the CUDA graphs' warm-ups (at most 128 rows) never
        reach them. Without this the first prefill chunk or decode batch of that size would
        wait for torch.compile. The toy request's K/V land on the first pages of the pool,
        which is empty at start-up (as for the graph captures). Returns whether it ran: a pool
        or a context length too small for the toy request skips it."""
        ps = self.pool.page_size
        pages = -(-ROWWISE_MIN_M // ps)
        if pages > self.pool.num_pages or ROWWISE_MIN_M > self.model.rope.cos.shape[0]:
            return False
        meta = build_metadata([list(range(pages))], [0], [ROWWISE_MIN_M], ps, self.device)
        ids = torch.zeros(ROWWISE_MIN_M, dtype=torch.long, device=self.device)
        hidden = self.model(ids, meta.positions, self.pool.layers, self.backend.plan(meta))
        self.model.logits(hidden[-1:])
        if self.device.type == "cuda":  # done before a step plans over the reused host buffers
            torch.cuda.synchronize(self.device)
        return True

    def execute(self, batch: ScheduledBatch) -> StepOutput:
        return self.launch(batch).result()

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch) -> LaunchedStep:
        tables = self.block_tables.sync(batch.requests)  # also frees the rows of leavers
        if not batch.requests:
            return LaunchedStep(0, [], None, {}, False)
        order = list(range(len(batch)))
        cascade = None
        if all(n == 1 for n in batch.num_new_tokens):
            cascade = plan_cascade(tables, [r.num_computed_tokens + 1 for r in batch.requests],
                                   self.pool.page_size, self.cfg.cascade)
            if cascade is not None:
                order = cascade.order
                tables = tables.take(order)
                self.num_cascade_steps += 1
                self.num_cascade_tokens += cascade.num_cascade_reqs
        reqs = [batch.requests[i] for i in order]
        num_new = [batch.num_new_tokens[i] for i in order]
        meta = build_metadata(tables, [r.num_computed_tokens for r in reqs], num_new,
                              self.pool.page_size, self.device, cascade)
        ids = self._input_ids(reqs, num_new)
        self._fence_plan()
        # Only a request whose step reaches its last token samples one.
        sampling = [i for i in range(len(reqs)) if batch.samples[order[i]]]
        last = [meta.qo_indptr_host[i + 1] - 1 for i in sampling]  # their rows
        want_prompt_lps = any(r.num_prompt_logprobs_missing for r in reqs)
        # Only the sampled rows need the last layer's output (a prefill chunk's last token),
        # unless prompt logprobs read every row's logits. A step whose rows all sample (decode)
        # or none (a chunk mid-prompt: no kernels of zero rows) keeps every row.
        cut = 0 < len(last) < meta.num_tokens and not want_prompt_lps
        graph_logits = hidden = None
        exporter = None
        timing = None
        if self.time_steps:
            timing = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            timing[0].record()
        if self.graphs is not None and self.graphs.can_run(meta):
            # [B, vocab]: every row is a last token
            graph_logits = self.graphs.run(ids, meta, on_planned=self._mark_planned)
        else:
            plan = self.backend.plan(meta)
            self._mark_planned()
            exporter = LayerExporter.for_step(reqs, num_new, self.pool, self.device)
            # Index tensors go through pinned memory: a plain copy would make the host wait for
            # the forward pass before it could prepare the sampling.
            hidden = self.model(ids, meta.positions, self.pool.layers, plan,
                                exporter.on_layer if exporter else None,
                                self._index(last) if cut else None)  # [S if cut else T, H]
        pending = None
        self._sampled = None
        if sampling:
            if graph_logits is None:
                # [S, H]: as the forward left them when cut, or every row's (a decode step)
                sampled = hidden if len(last) == hidden.shape[0] else hidden[self._index(last)]
                logits = self.model.logits(sampled)  # [S, vocab]
            elif len(sampling) == len(reqs):
                logits = graph_logits
            else:
                logits = graph_logits[self._index(sampling)]  # graph rows are the requests'
            pending = self.sampler.sample_async(logits, [reqs[i] for i in sampling])
            self._sampled = ({reqs[i]: j for j, i in enumerate(sampling)}, pending.token_ids)
        prompt_lps = {}
        if want_prompt_lps:
            def step_logits(rows: torch.Tensor) -> torch.Tensor:
                # graph rows are the requests' (one token each), so row i is request i's
                if graph_logits is not None:
                    return graph_logits[rows]
                return self.model.logits(hidden[rows])

            prompt_lps = self.prompt_logprobs.compute(reqs, num_new, meta.qo_indptr_host[:-1],
                                                      step_logits)
        if timing is not None:
            timing[1].record()
            self._timings.append(timing)
        return LaunchedStep(len(batch), [order[i] for i in sampling], pending, prompt_lps,
                            collect_now=bool(prompt_lps) or exporter is not None)

    def device_seconds(self) -> float:
        """The device time of the timed steps that have ended since the last call; never waits
        (a step that has not ended yet counts at a later call)."""
        total = 0.0
        while self._timings and self._timings[0][1].query():
            start, end = self._timings.popleft()
            total += start.elapsed_time(end) / 1e3
        return total

    def _input_ids(self, reqs: list[Request], num_new: list[int]) -> torch.Tensor:
        """[T] token ids on the device. A request's last input may be a placeholder (a token the
        step in flight samples): it is copied from that step's device tensor of sampled ids."""
        input_ids: list[int] = []
        dst, src = [], []
        for r, n in zip(reqs, num_new):
            start = r.num_computed_tokens
            if start + n <= r.num_tokens:
                input_ids += r.token_slice(start, n)
                continue
            # Only the single token of the step just launched can be missing (the scheduler
            # plans at most one step ahead), and that step sampled it for this request.
            assert start + n == r.num_tokens + 1 and self._sampled is not None, r.request_id
            input_ids += r.token_slice(start, n - 1)
            dst.append(len(input_ids))
            src.append(self._sampled[0][r])
            input_ids.append(0)
        ids = to_device_async(torch.tensor(input_ids, dtype=torch.long), self.device)
        if dst:
            ids[self._index(dst)] = self._sampled[1][self._index(src)]
        return ids

    def _fence_plan(self) -> None:
        """Attention planners stage their index arrays in pinned host buffers that they reuse
        every step, copied to the device asynchronously: with a step in flight, wait until the
        previous plan's copies have run before planning over those buffers again. They run at
        that step's start, so this waits little."""
        if self._planned is not None:
            self._planned.synchronize()

    def _mark_planned(self) -> None:
        if self.device.type == "cuda":
            self._planned = torch.cuda.Event()
            self._planned.record()

    def _index(self, values: list[int]) -> torch.Tensor:
        return to_device_async(torch.tensor(values, dtype=torch.long), self.device)
