"""A Mamba-2 layer's fused decode step (`mamba2_decode_step`): `reference.py`, `triton.py` (no TPU form)."""
