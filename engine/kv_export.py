"""KVExporter: a finished prefill request's prompt KV, read out of the pool for a transport to
send to another replica (the prefill role).

The copy is read on a CUDA stream of its own (`stream`; None off CUDA, where it runs as is). On
the engine's stream it would queue behind the step launched meanwhile (overlapped scheduling),
and the KV would leave a whole step late (~0.4 s for a prefill step of 16K tokens on one H200:
docs/benchmarks.md, "The exported KV a step late").

Contract: `export(req)` returns a KVExport of req's prompt pages from `req.kv_export_from` on,
with the chain hashes of all its full blocks. It takes no pages and frees none: the caller gives
them back afterwards (`Scheduler.release`), and later steps may reuse them at once, since the
engine's stream waits for the copy. A transport's `send` runs with `stream` current
(prefill/worker.py), so its own reads of the copy need no wait on the step in flight.

The export's memory belongs to `stream`: a reader on another stream keeps the tensor alive until
its reads are done (a transport's `send` returns after them, or holds the tensor), or records its
own stream on it (`KVPool.write_pages` does). The export records no other stream itself: a block
with another stream's use recorded calls CUDA when it is freed, and torch frees a block that its
CUDA IPC still holds (cuda_ipc, the last payloads before an exit) only as the process exits,
after the driver has shut down: the prefill process then aborted ("driver shutting down",
SIGABRT; docs/benchmarks.md, run 151).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from engine.block_hash import block_hashes
from engine.kv_pool import KVPool
from engine.kv_stream import LayerwiseExport
from engine.outputs import KVExport
from engine.request import Request


class KVExporter:
    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.device = pool.kv.device
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def export(self, req: Request) -> KVExport:
        ps = self.pool.page_size
        n_pages = -(-req.num_prompt_tokens // ps)
        layerwise = req.kv_stream
        if (isinstance(layerwise, LayerwiseExport)
                and layerwise.layers_ready == len(self.pool.layers)):
            data = layerwise.data  # copied layer by layer during the last prompt step
        else:
            with self._on_stream():
                data = self.pool.read_pages(req.block_table[req.kv_export_from:n_pages])
                if isinstance(layerwise, LayerwiseExport):  # that step ran without the hook
                    layerwise.fill(data)
        n_full = req.num_prompt_tokens // ps
        hashes = block_hashes(req.prompt_token_ids, ps, req.block_hashes[:n_full])
        return KVExport(data, req.kv_export_from, hashes)

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        """Work queued inside runs on `stream`.

        It waits for nothing: the export is made once the step that ended the prompt has
        returned its sampled tokens, so that step's kernels are done, and the step launched
        since was planned while the pages were still the request's, so no other request's rows
        write them. The engine's stream then waits for the copy before any later step, which
        may be given the pages once they are released. Reads of the export on the engine's
        stream are ordered after the copy by that wait."""
        with torch.cuda.stream(self.stream):  # None: changes nothing
            yield
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
