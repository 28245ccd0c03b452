"""Moving KV pages between replicas: payload format, transport interface, implementations."""

from __future__ import annotations

from kvtransfer.payload import KVPayload, model_fingerprint
from kvtransfer.registry import TRANSPORTS, make_transport
from kvtransfer.transport import KVTransferLost, KVTransport

__all__ = ["TRANSPORTS", "KVPayload", "KVTransferLost", "KVTransport", "make_transport",
           "model_fingerprint"]
