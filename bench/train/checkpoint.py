"""Training checkpoints: everything a run needs to continue its exact loss curve.

A checkpoint holds the model, the optimizer, step, data position, segment memory, running sums
and RNG states (`Trainer.state()`), written then renamed so a kill never leaves half a file.
Segment memory is packed into plain containers of CPU tensors that `torch.load(weights_only=True)`
reads back.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bench.data import Corpus
from bench.errors import CheckpointError, RunDirError

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 2  # 2: log-row sums keep step times, not their total


def write_checkpoint(out: Path, state: dict[str, Any]) -> None:
    tmp = out / f"{CHECKPOINT}.tmp"
    torch.save({"version": CHECKPOINT_VERSION, **state}, tmp)
    tmp.replace(out / CHECKPOINT)


LOG = "train_log.csv"  # bench.train.loop's log: a run started in this directory


def _log_only(out: Path) -> str:
    return (f"{out} holds {LOG} but no {CHECKPOINT} (a run killed before its first checkpoint, "
            f"or by an older deq-bench): nothing to resume from; delete it to start again, or "
            "choose another --out")


def check_new_run_dir(out: Path) -> None:
    """A fresh training run may start in `out`: it holds no run (RunDirError says what to do)."""
    if (out / CHECKPOINT).exists():
        raise RunDirError(f"{out} already holds a training run; use --resume to continue it or "
                          "choose another --out")
    if (out / LOG).exists():
        raise RunDirError(_log_only(out))


def load_checkpoint(out: Path) -> dict[str, Any]:
    """The checkpoint in `out`; CheckpointError (one line) when it is missing or unreadable."""
    path = Path(out) / CHECKPOINT
    if not path.is_file():
        if (Path(out) / LOG).is_file():
            raise CheckpointError(_log_only(Path(out)))
        raise CheckpointError(f"nothing to resume: {path} does not exist")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # any unreadable checkpoint is a user-facing error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {path} ({first}); start a new run "
                              "in another --out") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise CheckpointError(f"{path} is not a deq-bench checkpoint of format {CHECKPOINT_VERSION} "
                              f"(found {version!r}); start a new run in another --out")
    return state


def corpus_digest(corpus: Corpus) -> str:
    """A hash of the vocabulary and the token streams: resuming needs the same data."""
    h = hashlib.sha256("\n".join(corpus.vocab).encode())
    for role in ("train", "valid", "test"):
        stream = corpus.split(role)
        h.update(role.encode())
        if stream is not None:
            h.update(stream.numpy().tobytes())
    return h.hexdigest()


def pack_memory(obj: Any) -> Any:
    """Segment memory (tensors in tuples, named tuples, lists, dicts) as plain containers of CPU
    tensors; named tuples keep their class name."""
    if obj is None or isinstance(obj, Tensor):
        return None if obj is None else obj.detach().cpu()
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        kind = type(obj)
        return {"namedtuple": [f"{kind.__module__}:{kind.__qualname__}", [pack_memory(v) for v in obj]]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [pack_memory(v) for v in obj]}
    if isinstance(obj, dict):
        return {"dict": {k: pack_memory(v) for k, v in obj.items()}}
    raise TypeError(f"cannot checkpoint segment memory of type {type(obj).__name__}")


def unpack_memory(obj: Any, device: torch.device) -> Any:
    if obj is None or isinstance(obj, Tensor):
        return None if obj is None else obj.to(device)
    ((kind, payload),) = obj.items()
    if kind == "namedtuple":
        module, _, name = payload[0].partition(":")
        cls: Any = importlib.import_module(module)
        for part in name.split("."):
            cls = getattr(cls, part)
        return cls(*(unpack_memory(v, device) for v in payload[1]))
    if kind == "dict":
        return {k: unpack_memory(v, device) for k, v in payload.items()}
    values = [unpack_memory(v, device) for v in payload]
    return tuple(values) if kind == "tuple" else values
