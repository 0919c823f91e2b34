"""The core: loading models, tokens and batches, parameter checks, recorded results, plots, seeds and
statistics. Nothing here imports from the layers above (data, mechanisms, experiments)."""
