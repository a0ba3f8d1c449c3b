"""Microstructure analysis of the mosaic: phase fractions, lamellae, maps, profiles, correlation."""
