"""The Ray Serve application: config schema, deployments wiring, metrics hub."""
