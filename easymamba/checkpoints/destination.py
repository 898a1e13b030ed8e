"""Where a save may write: a new or empty directory, or, with `overwrite=True`, one that holds a checkpoint; and
one save at a time.

`claim(directory, overwrite, what)` is the context every save (`save_pretrained`, `save_checkpoint`,
`save_train_state`) runs in:

- It creates the directory if needed and takes an exclusive `fcntl.flock` on the directory itself (no lock file is
  left behind), without waiting: a second save into the same directory, from this or another process, raises
  `CheckpointError` at once instead of interleaving its files with the first's. The lock goes with the file
  descriptor, so a process that dies or exits releases it; nothing waits, so nothing can hang at exit.
- Under the lock, a directory that holds anything is refused with `CheckpointError` listing what it holds, unless
  `overwrite=True`. A save never deletes a file it would not itself write: with `overwrite=True` an HF save
  replaces `config.json` and the weight files (a stale `model.safetensors` would shadow new shards), an orbax save
  its earlier versions, and every other file stays.

Multi-host: each process of a `jax.distributed` job joins one collective orbax save, so there the lock is not
taken (the processes would refuse each other); every process checks the directory, then all meet at a barrier
before anything is written, so none sees another's files.
"""

import contextlib
import errno
import fcntl
import os
import pathlib

import jax

from easymamba.checkpoints.errors import CheckpointError


def _listing(entries: list[pathlib.Path]) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in entries)
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


def check_empty(directory: pathlib.Path, overwrite: bool, what: str) -> None:
    """Refuse a `directory` that holds anything, unless `overwrite`."""
    entries = list(directory.iterdir())
    if entries and not overwrite:
        raise CheckpointError(f"{directory} is not empty (it holds {_listing(entries)}): {what} writes into a new or "
                              "empty directory; pass overwrite=True to replace the checkpoint in it (files of other "
                              "names are kept)")


@contextlib.contextmanager
def claim(directory: "str | os.PathLike", *, overwrite: bool, what: str):
    """Create `directory`, lock it against other saves and check that it may be written (module docstring);
    yields its absolute path."""
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, not {overwrite!r}")
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} is a file, not a directory: {what} writes a checkpoint directory")
    directory.mkdir(parents=True, exist_ok=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        check_empty(directory, overwrite, what)
        multihost_utils.sync_global_devices(f"easymamba save into {directory}")
        yield directory
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise CheckpointError(f"{directory} is being written by another save right now (it holds the "
                                  f"directory's lock); {what} does not write into it at the same time: wait for "
                                  "that save to finish, or choose another directory") from None
        check_empty(directory, overwrite, what)
        yield directory
    finally:
        os.close(fd)  # releases the lock


__all__ = ["check_empty", "claim"]
