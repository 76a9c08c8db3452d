"""Checkpoints that resume a run exactly: model, optimizer, LR schedule, step, data position,
carried memory, RNG states and logs.

Two layouts, both loaded with ``torch.load(..., weights_only=True)`` (tensors and plain
containers only: a checkpoint holding any other pickled object is refused):

- one file (one process and DDP): written by rank 0 as ``PATH.tmp-<pid>``, flushed to disk, then
  renamed over ``PATH`` (``os.replace`` is atomic), so a run killed while saving leaves the
  previous checkpoint intact.
- a directory (FSDP2, sharded with ``torch.distributed.checkpoint``): ``PATH/step-<n>-<id>/`` holds the
  shards of the model and optimizer tensors written by every rank plus ``meta.pt`` (everything
  else); ``PATH/latest`` names the complete one and is replaced atomically only once every rank
  has finished writing, then older ``step-*`` folders are removed. The ``.metadata`` index of
  ``torch.distributed.checkpoint`` is a pickle: it is checked against an allowlist of the classes
  that format uses before it is read.

The data position and the memory are stored in global row order, so a checkpoint does not depend
on the number of processes that wrote it (the rows must split evenly over the new number); RNG
states are stored per process. Resuming checks the configuration first: a checkpoint from another
model or data configuration is refused with the list of differing fields, before any step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import pickle
import random
import shutil
import time
import warnings
import zipfile

import numpy as np
import torch

from chunkmem.training.config import ARCH_KEYS, DATA_KEYS

__all__ = ["FORMAT", "CheckpointError", "atomic_save", "read_checkpoint", "check_config", "rng_state",
           "set_rng_state", "save_checkpoint", "load_checkpoint", "load_model_state"]

FORMAT = "chunkmem-train-1"
LATEST = "latest"
META = "meta.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: missing, unreadable, unsafe or from another config."""


# ------------------------------------------------------------------------------------ files

def atomic_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _load_weights_only(path: str, what: str):
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{what} {path} is not a readable checkpoint (not a torch.save archive)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = [ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln]
        raise CheckpointError(
            f"refusing to load {what} {path}: it holds Python objects other than tensors and plain "
            f"containers (torch.load with weights_only=True: {why[0] if why else str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{what} {path} is not a readable checkpoint ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _resolve(path: str) -> tuple[str, str | None]:
    """(file or step folder, None or the DCP folder) of the checkpoint at ``path``."""
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path!r} (no such file or directory)")
    if os.path.isdir(path):
        latest = os.path.join(path, LATEST)
        if not os.path.isfile(latest):
            raise CheckpointError(f"{path!r} is a directory without a {LATEST!r} file: not a sharded checkpoint")
        with open(latest) as fh:
            name = fh.read().strip()
        sub = os.path.join(path, name)
        if not name or os.sep in name or not os.path.isfile(os.path.join(sub, META)):
            raise CheckpointError(f"sharded checkpoint {path!r}: {LATEST!r} names {name!r}, which is incomplete")
        return os.path.join(sub, META), sub
    return path, None


def read_checkpoint(path: str) -> tuple[dict, str | None]:
    """The plain part of the checkpoint at ``path`` (a file or a sharded directory) and the
    folder of its shards (None for a single file). Raises CheckpointError."""
    file, shards = _resolve(path)
    ckpt = _load_weights_only(file, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a chunkmem training checkpoint (format "
                              f"{ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r}, "
                              f"expected {FORMAT!r})")
    return ckpt, shards


def check_config(saved: dict, cfg, path: str) -> None:
    """Raise CheckpointError listing every model/data field where ``saved`` differs from ``cfg``."""
    now = dataclasses.asdict(cfg)
    # a field the checkpoint lacks (written before it existed) has its default value
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    saved = {**{k: defaults[k] for k in ARCH_KEYS + DATA_KEYS if k not in saved}, **saved}

    def norm(v):
        return list(v) if isinstance(v, (list, tuple)) else v

    diff = [f"{k}: checkpoint {saved.get(k)!r}, this run {now[k]!r}" for k in ARCH_KEYS + DATA_KEYS
            if norm(saved.get(k)) != norm(now[k])]
    if diff:
        raise CheckpointError(f"checkpoint {path!r} was written with another configuration; it cannot be "
                              "resumed with this one. Differences:\n  " + "\n  ".join(diff))


# ------------------------------------------------------------------------------ RNG states

def rng_state() -> dict:
    """This process's RNG states (torch CPU and CUDA, Python ``random``, NumPy's global) as tensors."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "python_version": version,
           "python": torch.tensor(mt, dtype=torch.int64), "python_gauss": gauss,
           "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos),
           "numpy_has_gauss": int(has_gauss), "numpy_gauss": float(cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((s["python_version"], tuple(int(v) for v in s["python"].tolist()), s["python_gauss"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], s["numpy_has_gauss"],
                         s["numpy_gauss"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# ------------------------------------------------------------------------- save and load

def _state_dict_api():
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                         set_state_dict)
    return StateDictOptions, get_state_dict, set_state_dict


def save_checkpoint(trainer, path: str) -> None:
    """Checkpoint ``trainer`` to ``path`` (every process calls it). FSDP2 runs write a sharded
    directory, the others a single file from rank 0."""
    ctx = trainer.ctx
    plain = _plain_state(trainer)
    StateDictOptions, get_state_dict, _ = _state_dict_api()
    if trainer.parallel == "fsdp":
        _save_sharded(trainer, path, plain)
        return
    model_sd, optim_sd = get_state_dict(trainer.module, trainer.opt,
                                        options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=ctx.active))
    if ctx.is_main:
        plain["model"], plain["optimizer"] = model_sd, optim_sd
        atomic_save(plain, path)
    ctx.barrier()


def _plain_state(trainer) -> dict:
    """Everything but the model and optimizer tensors (collective: see Trainer.run_state)."""
    return {"format": FORMAT, "config": dataclasses.asdict(trainer.cfg), "world_size": trainer.ctx.world_size,
            "parallel": trainer.parallel, **trainer.run_state()}


def _save_sharded(trainer, path: str, plain: dict) -> None:
    import torch.distributed.checkpoint as dcp
    _, get_state_dict, _ = _state_dict_api()
    ctx = trainer.ctx
    model_sd, optim_sd = get_state_dict(trainer.module, trainer.opt)
    # a new folder name for every save, so the folder ``latest`` names is never touched
    name = ctx.broadcast_object(f"step-{trainer.step_count:08d}-{time.time_ns():x}")
    final, tmp = os.path.join(path, name), os.path.join(path, name + ".tmp")
    if ctx.is_main:
        os.makedirs(path, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    ctx.barrier()
    with _one_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd["state"]}, checkpoint_id=tmp)
    if ctx.is_main:
        plain["optimizer_param_groups"] = optim_sd["param_groups"]
        atomic_save(plain, os.path.join(tmp, META))
        os.replace(tmp, final)
        _fsync_dir(path)
        _atomic_write_text(os.path.join(path, LATEST), name + "\n")  # the commit point
        for old in os.listdir(path):
            if old.startswith("step-") and old != name:
                shutil.rmtree(os.path.join(path, old), ignore_errors=True)
    ctx.barrier()


def load_checkpoint(trainer, path: str) -> None:
    """Resume ``trainer`` from ``path`` (file or sharded directory, written by any number of
    processes). Everything is read and checked before the trainer is changed."""
    ckpt, shards = read_checkpoint(path)
    check_config(ckpt["config"], trainer.cfg, path)
    StateDictOptions, get_state_dict, set_state_dict = _state_dict_api()
    if shards is None:
        set_state_dict(trainer.module, trainer.opt, model_state_dict=ckpt["model"],
                       optim_state_dict=ckpt["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        model_sd, optim_sd = get_state_dict(trainer.module, trainer.opt)
        _dcp_load({"model": model_sd, "optim": optim_sd["state"]}, shards)
        optim_sd["param_groups"] = ckpt["optimizer_param_groups"]
        set_state_dict(trainer.module, trainer.opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    trainer.load_run_state(ckpt)


def load_model_state(model: torch.nn.Module, path: str) -> dict:
    """Load only the model weights of the checkpoint at ``path`` into a plain (unwrapped) ``model``
    on one process; returns the checkpoint's plain part (its ``config`` etc.)."""
    ckpt, shards = read_checkpoint(path)
    if shards is None:
        model.load_state_dict(ckpt["model"])
    else:
        sd = model.state_dict()
        _dcp_load({"model": sd}, shards)
        model.load_state_dict(sd)
    return ckpt


# ---------------------------------------------------------- torch.distributed.checkpoint index

def _dcp_load(state: dict, folder: str) -> None:
    """``dcp.load`` in place, after checking the index; quiet about loading on one process."""
    import torch.distributed.checkpoint as dcp
    _check_dcp_index(folder)
    with _one_process_quiet():
        dcp.load(state, checkpoint_id=folder)


@contextlib.contextmanager
def _one_process_quiet():
    """Without a process group, torch.distributed.checkpoint warns that it assumes one process:
    that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


_INDEX_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                  ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
                  ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles only what a ``torch.distributed.checkpoint`` index is made of: its metadata
    dataclasses, torch.Size, dtypes, layouts, memory formats and the checkpoint's path."""

    def find_class(self, module, name):
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in _INDEX_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                        torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")


def _check_dcp_index(folder: str) -> None:
    index = os.path.join(folder, ".metadata")
    try:
        with open(index, "rb") as fh:
            _IndexUnpickler(io.BytesIO(fh.read())).load()
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load sharded checkpoint {folder}: {e}") from None
    except (OSError, EOFError) as e:
        raise CheckpointError(f"sharded checkpoint {folder} has no readable index ({e})") from None
