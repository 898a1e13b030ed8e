"""Reading JSON that comes from outside (checkpoint headers and indexes, `config.json`, cache documents) strictly.

Python's `json` accepts duplicate keys (the last wins, so two readers may see two documents), raises a bare
`RecursionError` on deeply nested input and a `UnicodeDecodeError` naming no file on bad bytes. `loads` turns each
into one error of the caller's documented type (`ValueError`, or `CheckpointError` for checkpoints) naming where
the text came from: duplicate keys, nesting deeper than `MAX_DEPTH`, bytes that are not UTF-8, text that is not
JSON. None of our documents nests more than a few levels, so the bound costs nothing legitimate.
"""

import json
from typing import Any

MAX_DEPTH = 64  # objects and arrays inside one another; our documents use at most about 6


def _no_duplicates(where: str, error: type[Exception]):
    def hook(pairs):
        out = {}
        for key, value in pairs:
            if key in out:
                raise error(f"{where} has key {key!r} twice in one object (expected each key once)")
            out[key] = value
        return out
    return hook


def depth(obj: Any) -> int:
    """How deeply objects and arrays nest in `obj` (0 for a scalar), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def loads(data: "bytes | str", where: str, error: type[Exception] = ValueError) -> Any:
    """The JSON document in `data` (bytes are decoded as UTF-8), or `error` naming `where` and the fault."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{where} is not UTF-8 text: byte {exc.object[exc.start]:#04x} at offset {exc.start} "
                        "(expected UTF-8 JSON)") from None
    if not isinstance(data, str):
        raise error(f"{where} must be JSON text (str or bytes); got {type(data).__name__}")
    try:
        obj = json.loads(data, object_pairs_hook=_no_duplicates(where, error))
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not JSON: {exc}") from None
    except RecursionError:
        raise error(f"{where} nests objects and arrays deeper than {MAX_DEPTH} levels (expected a flat "
                    "document)") from None
    if depth(obj) > MAX_DEPTH:
        raise error(f"{where} nests objects and arrays deeper than {MAX_DEPTH} levels (expected a flat document)")
    return obj


def load_object(path, error: type[Exception] = ValueError) -> dict:
    """The JSON object in file `path` (`loads`'s rules), or `error` naming the file when it holds anything else."""
    obj = loads(open(path, "rb").read(), str(path), error)
    if not isinstance(obj, dict):
        raise error(f"{path} must hold a JSON object; got {type(obj).__name__}")
    return obj


__all__ = ["MAX_DEPTH", "depth", "loads", "load_object"]
