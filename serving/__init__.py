"""What every serving deployment shares: the app config schema, replica set-up, the metrics hub,
and the prefill/decode protocol. Below the roles (prefill, decode, colocated) and the API."""
