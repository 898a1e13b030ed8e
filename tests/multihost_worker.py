"""One process of the two-process `jax.distributed` run in tests/test_multihost.py (not a test itself).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT CHECKPOINT_DIR IDS.npy OUT_DIR

Each process sees 4 CPU devices (XLA_FLAGS from the parent) and joins a loopback coordinator; the mesh spans
all 8. Every process runs the same program, as on a real multi-host job: load the checkpoint sharded (each
process reads only the slices of its own devices), prefill, one decode step, greedy `generate`. The results
are gathered to every process (`process_allgather`) and process 0 writes them for the parent to compare.
"""

import json
import pathlib
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main() -> None:
    process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
    checkpoint, ids_path, out_dir = sys.argv[4], sys.argv[5], pathlib.Path(sys.argv[6])
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
                               process_id=process_id, initialization_timeout=120)
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    import easymamba as em

    assert jax.process_count() == num_processes and jax.device_count() == 4 * num_processes
    mesh = em.make_mesh(2, 4)                              # data over processes' rows, model within
    model = em.from_pretrained(checkpoint, mesh=mesh)
    local = sum(s.data.nbytes for _, v in nnx.to_flat_state(nnx.state(model))
                for s in v.get_value().addressable_shards)
    ids_host = np.load(ids_path)
    ids = em.shard_batch(ids_host, mesh)                   # global array; this process holds its rows
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, i, c: nnx.merge(graphdef, s)(i, cache=c))
    out = forward(state, ids, model.init_cache(ids_host.shape[0]))
    step = forward(state, em.shard_batch(ids_host[:, -1:], mesh), out.cache)
    gen = em.generate(model, ids, max_new_tokens=4)

    def gather(x):
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    results = {"logits": gather(out.logits), "step_logits": gather(step.logits),
               "ssm_state": gather(step.cache.views[0].ssm_states), "tokens": gather(gen.sequences)}
    specs = {"logits": str(out.logits.sharding.spec), "conv": str(step.cache.views[0].conv_states.sharding.spec),
             "ssm": str(step.cache.views[0].ssm_states.sharding.spec),
             "fully_addressable": bool(out.logits.is_fully_addressable)}
    if process_id == 0:
        np.savez(out_dir / "results.npz", **results)
    (out_dir / f"process_{process_id}.json").write_text(json.dumps(
        {"process": process_id, "local_param_bytes": int(local), "specs": specs,
         "local_devices": [d.id for d in jax.local_devices()]}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
