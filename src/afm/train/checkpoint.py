"""Training checkpoints with torch.distributed.checkpoint: sharded model and optimizer state, plus the
trainer's own state (phase, step, data-loader position) and every rank's RNG states.

A checkpoint is written into `checkpoints/step-NNNNNNNN.partial/` and renamed to `step-NNNNNNNN/`
once every rank has finished writing, so a directory without `.partial` is always complete: a killed
process or a full disk leaves at most a `.partial` directory, which the next save or resume removes.
The newest `keep_last` checkpoints are kept. DCP reshards on load, so a run can resume on another
number of ranks.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from afm.io import atomic_write, atomic_write_text
from afm.train.parallel import DistInfo

TRAINER_STATE = "trainer.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


@contextlib.contextmanager
def _single_process_quiet(info: DistInfo) -> Iterator[None]:
    """DCP warns that it runs without a process group; in a one-process run that is the intent."""
    with warnings.catch_warnings():
        if not info.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer],
         trainer_state: dict[str, Any], info: DistInfo, keep_last: int) -> Path:
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:08d}"
    partial = root / f"step-{step:08d}.partial"
    if info.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier(info)
    model_sd, optim_sd = get_state_dict(model, optimizers)
    with _single_process_quiet(info):
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(partial))
    atomic_write(partial / f"rng-{info.rank}.pt", lambda tmp: torch.save(rng_state(), tmp))
    if info.is_main:
        atomic_write_text(partial / TRAINER_STATE, json.dumps({**trainer_state, "world_size": info.world_size}))
    _barrier(info)
    if info.is_main:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        complete = sorted(p for p in root.glob("step-*") if not p.name.endswith(".partial"))
        for old in complete[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(info)
    return final


def latest(run_dir: Path) -> Path | None:
    root = checkpoint_dir(run_dir)
    complete = sorted(p for p in root.glob("step-*") if not p.name.endswith(".partial") and (p / TRAINER_STATE).exists())
    return complete[-1] if complete else None


def load(path: Path, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], info: DistInfo) -> dict[str, Any]:
    """Restore model, optimizers and this rank's RNG; return the trainer state."""
    model_sd, optim_sd = get_state_dict(model, optimizers)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_quiet(info):
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = json.loads((path / TRAINER_STATE).read_text())
    rng_file = path / f"rng-{info.rank}.pt"
    if rng_file.exists() and trainer.get("world_size") == info.world_size:
        set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer
