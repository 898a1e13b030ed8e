"""Which Pallas GPU backend compiles our kernels on this machine: Triton (explicit params) vs Mosaic GPU (jax's
default for a bare pallas_call since 0.9). Prints one line per (kernel, backend).

    PYTHONPATH=. python benchmarks/probe_backends.py
"""

import os
import subprocess
import sys

SNIPPET = """
import jax, jax.numpy as jnp
from easymamba.kernels import ssd_pallas, selective_state_update_pallas, causal_conv1d_pallas
k = jax.random.split(jax.random.key(0), 6)
bf = jnp.bfloat16
which = {which!r}
if which == "state_update":
    s = jax.random.normal(k[0], (2, 4, 64, 128)); x = jax.random.normal(k[1], (2, 4, 64))
    out = selective_state_update_pallas(s, x, x[..., 0], -jnp.ones(4), x[:, :1, :].repeat(2, 2), x[:, :1].repeat(2, 2))
elif which == "conv1d":
    out = causal_conv1d_pallas(jax.random.normal(k[0], (2, 128, 256), bf), jax.random.normal(k[1], (256, 4), bf))
else:
    x = jax.random.normal(k[0], (1, 128, 2, 64), bf); B = jax.random.normal(k[1], (1, 128, 1, 128), bf)
    out = ssd_pallas(x, jax.random.normal(k[2], (1, 128, 2)), -jnp.ones(2), B, B)
jax.block_until_ready(out)
print("ok")
"""

for backend in ("triton", "mosaic"):
    for which in ("state_update", "conv1d", "ssd"):
        env = dict(os.environ, EASYMAMBA_PALLAS_GPU_BACKEND=backend)
        proc = subprocess.run([sys.executable, "-c", SNIPPET.format(which=which)], env=env, capture_output=True,
                              text=True, timeout=240)
        text = (proc.stdout + proc.stderr).strip().splitlines()
        errors = [t for t in text if "Error" in t or "error" in t]
        verdict = "compiles and runs" if proc.returncode == 0 and text and text[-1] == "ok" else (
            "FAILS: " + (errors[-1] if errors else text[-1] if text else "no output"))[:400]
        print(f"{which:13s} {backend:7s} {verdict}", flush=True)
