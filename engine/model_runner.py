"""Runs one scheduled batch through the model: inputs, attention plan, forward, sampling."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.attention.base import AttentionBackend
from engine.attention.cascade import plan_cascade
from engine.attention.metadata import build_metadata
from engine.block_table import BlockTableMirror
from engine.config import EngineConfig
from engine.kv_pool import KVPool
from engine.kv_stream import LayerExporter
from engine.model import CausalLM
from engine.outputs import TokenLogprob
from engine.prompt_logprobs import PromptLogprobs
from engine.request import Request
from engine.sampler import Sampler, to_device_async
from engine.scheduler import ModelOutput, ScheduledBatch


@dataclass
class StepOutput(ModelOutput):
    """ModelOutput plus the prompt logprobs the step computed: new entries of each request's
    `prompt_logprobs` (engine/prompt_logprobs.py), which the engine appends."""

    prompt_logprobs: dict[Request, list[TokenLogprob | None]] = field(default_factory=dict)


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
        if cfg.cuda_graphs and device.type == "cuda":
            from engine.cuda_graph import CudaGraphRunner

            self.graphs = CudaGraphRunner(model, pool, backend, cfg.max_num_seqs, device,
                                          cascade_graphs=cfg.cascade != "off")

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> StepOutput:
        tables = self.block_tables.sync(batch.requests)  # also frees the rows of leavers
        if not batch.requests:
            return StepOutput([])
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
        input_ids = []
        for r, n in zip(reqs, num_new):
            input_ids += r.token_slice(r.num_computed_tokens, n)
        ids = torch.tensor(input_ids, dtype=torch.long).to(self.device, non_blocking=True)
        graph_logits = hidden = None
        if self.graphs is not None and self.graphs.can_run(meta):
            graph_logits = self.graphs.run(ids, meta)  # [B, vocab]: every row is a last token
        else:
            plan = self.backend.plan(meta)
            exporter = LayerExporter.for_step(reqs, num_new, self.pool, self.device)
            hidden = self.model(ids, meta.positions, self.pool.layers, plan,
                                exporter.on_layer if exporter else None)  # [T, H]
        # Only a request whose step reaches its last token samples one.
        sampling = [i for i, (r, n) in enumerate(zip(reqs, num_new))
                    if r.num_computed_tokens + n == r.num_tokens]
        token_ids: list[int | None] = [None] * len(batch)
        logprobs: list = [None] * len(batch)
        if sampling:
            # Index tensors go through pinned memory: a plain copy would make the host wait for
            # the forward pass before it could prepare the sampling.
            if graph_logits is None:
                last = [meta.qo_indptr_host[i + 1] - 1 for i in sampling]
                logits = self.model.logits(hidden[self._index(last)])  # [S, vocab]
            elif len(sampling) == len(reqs):
                logits = graph_logits
            else:
                logits = graph_logits[self._index(sampling)]  # graph rows are the requests'
            out = self.sampler.sample(logits, [reqs[i] for i in sampling])
            for i, tok, lp in zip(sampling, out.token_ids, out.logprobs):
                token_ids[order[i]] = tok
                logprobs[order[i]] = lp
        prompt_lps = {}
        if any(r.num_prompt_logprobs_missing for r in reqs):
            def step_logits(rows: torch.Tensor) -> torch.Tensor:
                # graph rows are the requests' (one token each), so row i is request i's
                if graph_logits is not None:
                    return graph_logits[rows]
                return self.model.logits(hidden[rows])

            prompt_lps = self.prompt_logprobs.compute(reqs, num_new, meta.qo_indptr_host[:-1],
                                                      step_logits)
        return StepOutput(token_ids, logprobs, prompt_lps)

    def _index(self, values: list[int]) -> torch.Tensor:
        return to_device_async(torch.tensor(values, dtype=torch.long), self.device)
