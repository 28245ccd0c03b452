"""The prefill role: prompts in, first token + KV pages out."""
