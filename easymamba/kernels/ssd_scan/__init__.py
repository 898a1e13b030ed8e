"""The Mamba-2 SSD scan: `reference.py` (the ground truth and the chunked form), `gpu.py` (`ssd_pallas`, the GPU
entry), `triton.py` and `triton_bwd.py` (the Triton-style kernels), `mosaic_gpu.py` (Hopper), `mosaic_tpu.py` (TPU).
The public op is `easymamba.kernels.ssd`; this folder is not named `ssd` so that it does not shadow it."""
