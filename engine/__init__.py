"""pdserve's engine: everything the prefill and decode roles share. Never imports ray."""
