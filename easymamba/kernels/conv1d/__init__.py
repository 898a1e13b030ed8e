"""The depthwise causal conv1d and its decode update: `reference.py`, `triton.py`, `mosaic_tpu.py`."""
