"""The decode role: admits requests whose KV arrived, continuously batches their generation."""
