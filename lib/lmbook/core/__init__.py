"""The core: loading models, tokens and batches, parameter checks, recorded results and the claims
that interpret them, plots, seeds and statistics. Nothing here imports from the layers above (data,
mechanisms, experiments)."""
