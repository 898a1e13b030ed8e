"""Two processes under `jax.distributed` on one machine give the single-process numbers.

Each process has 4 CPU devices (`--xla_force_host_platform_device_count=4`), the two join a loopback
coordinator and talk through gloo (`jax_cpu_collectives_implementation`); the (2, 4) mesh spans both, with
`data` across processes. The worker (tests/multihost_worker.py) loads an HF checkpoint sharded, prefills,
takes a decode step and runs greedy `generate`. Here, in this process, the same checkpoint runs unsharded.
Tolerance 1e-5 relative (float32 rounding of a different reduction order, as in test_sharding); greedy
tokens identical.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

import easymamba as em
from helpers import hf_logits, random_hf_model, random_ids, rel_err

TOL = 1e-5
WORKER = pathlib.Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    hf_model = random_hf_model(seed=41, n_groups=2, vocab_size=96)
    hf_model.save_pretrained(tmp_path / "hf")
    ids = random_ids(np.random.default_rng(3), 4, 10, 96)
    np.save(tmp_path / "ids.npy", ids)

    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(pathlib.Path(em.__file__).parents[1]), env.get("PYTHONPATH", "")]))
    port = _free_port()
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(i), "2", str(port), str(tmp_path / "hf"),
                                 str(tmp_path / "ids.npy"), str(tmp_path)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for i in range(2)]
    logs = []
    try:
        for w in workers:
            logs.append(w.communicate(timeout=300)[0])
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    for i, w in enumerate(workers):
        assert w.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"

    reports = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
    assert set(reports[0]["local_devices"]).isdisjoint(reports[1]["local_devices"])
    for r in reports:  # global arrays, laid out by the rules, nothing gathered to one process
        assert r["specs"] == {"logits": "P('data', None, 'model')", "conv": "P('data',)", "ssm": "P('data', 'model')",
                              "fully_addressable": False}, r
    got = np.load(tmp_path / "results.npz")

    model = em.from_pretrained(tmp_path / "hf")                     # one process, unsharded
    want = hf_logits(hf_model, ids)
    assert rel_err(got["logits"], want) <= TOL
    out = model(jnp.asarray(ids), cache=model.init_cache(4))
    assert rel_err(got["logits"], out.logits) <= TOL
    step = model(jnp.asarray(ids[:, -1:]), cache=out.cache)
    assert rel_err(got["step_logits"], step.logits) <= TOL
    assert rel_err(got["ssm_state"], step.cache.views[0].ssm_states) <= TOL
    tokens = em.generate(model, ids, max_new_tokens=4).sequences
    np.testing.assert_array_equal(got["tokens"], np.asarray(tokens))
    # each process holds half of the data-parallel replicas' shards: same bytes in both
    assert reports[0]["local_param_bytes"] == reports[1]["local_param_bytes"]
