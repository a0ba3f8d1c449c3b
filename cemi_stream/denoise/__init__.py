"""The denoiser: training data, degradation, training, inference backends,
evaluation and the pipeline stage (SEMNET/SEMGAN of the CEMI paper)."""
