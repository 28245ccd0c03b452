"""Moving KV pages between replicas: payload format, transport interface, implementations."""

from __future__ import annotations

from kvtransfer.payload import KVPayload, model_fingerprint
from kvtransfer.transport import KVTransport, make_transport

__all__ = ["KVPayload", "KVTransport", "make_transport", "model_fingerprint"]
