"""The token path's two names, written once: where a request's outputs go (its address, which
travels with the Serve call) and what reads them at the ingress, for each `token_path` with a
step-batched path (`socket`: serving/token_socket.py; `mailbox`: serving/token_mailbox.py)."""

from __future__ import annotations

from serving.token_fanout import TokenReader
from serving.token_mailbox import Mailbox, MailboxReader
from serving.token_socket import SocketReader, TokenSocket

TokenAddress = Mailbox | TokenSocket

READERS: dict[str, type[TokenReader]] = {"mailbox": MailboxReader, "socket": SocketReader}


def make_reader(token_path: str) -> TokenReader | None:
    """An ingress replica's reader for `token_path`; None for `stream` (a Serve stream per
    request, no reader)."""
    kind = READERS.get(token_path)
    return kind() if kind is not None else None
