"""The live stitcher: registration, position tracking, global solve and the mosaic."""
