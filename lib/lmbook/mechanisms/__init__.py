"""Mechanisms any chapter may use: reading the residual stream through the unembedding (readout),
interventions at positions and layers (interventions, knockout), what a sublayer writes (sublayers),
generation, the likelihood of text, and training. Uses only the core; never an experiment."""
