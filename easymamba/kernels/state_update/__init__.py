"""One decode step of the SSD recurrence (`selective_state_update`): `reference.py`, `triton.py`, `mosaic_tpu.py`."""
