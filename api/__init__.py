"""HTTP layer: OpenAI- and TGI-compatible routes over a generation client (see api/server.py)."""
