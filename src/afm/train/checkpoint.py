"""Training checkpoints with torch.distributed.checkpoint: sharded model and optimizer state, plus the
trainer's own state (phase, step, data-loader position) and every rank's RNG states.

A checkpoint is written into `checkpoints/step-NNNNNNNN.partial/` and renamed to `step-NNNNNNNN/`
once every rank has finished writing, so a directory without `.partial` is always complete: a killed
process or a full disk leaves at most a `.partial` directory, which the next save removes. The newest
`keep_last` checkpoints are kept. DCP reshards on load, so a run can resume on another number of ranks.

The last file written before the rename is `manifest.json`: every other file's size and SHA-256.
Resuming verifies a checkpoint against it before DCP reads anything, then checks that every loaded
floating-point tensor is finite; a checkpoint that fails either (or whose trainer.json or RNG file is
missing or unreadable) is reported in one line and the next older one is tried. Only when none is
usable does resuming fail, with a CheckpointError naming each checkpoint and what is wrong with it.
Checkpoints written before manifests existed still load, reported as unverified.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from afm.errors import CheckpointError
from afm.io import atomic_write, atomic_write_text
from afm.model.hf import count_non_finite
from afm.train.parallel import DistInfo

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer.json"
MANIFEST = "manifest.json"
DCP_METADATA = ".metadata"  # DCP's index of the sharded state (torch.distributed.checkpoint.filesystem)
# SHA-256: it detects any change, and with the CPU's SHA instructions it hashes about 1.2-1.3 GB/s on one
# core, faster than BLAKE2b and within 1-2.5x of zlib's CRC-32 (docs/benchmarks.md); the ranks share
# the files, so the time per rank falls with their number.
CHECKSUM = "sha256"
_READ_CHUNK = 8 << 20


class UnusableCheckpointError(CheckpointError):
    """One checkpoint cannot be resumed from: damaged (`reason` names the file and what is wrong with it),
    or not loadable into this run's model and optimizers."""

    def __init__(self, path: Path, reason: str, damaged: bool = True) -> None:
        verdict = "is damaged" if damaged else "cannot be loaded"
        self.path, self.reason, self.what = path, reason, f"{path.name} {verdict}: {reason}"
        super().__init__(f"{path} {verdict}: {reason}")


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def _gather(info: DistInfo, value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (just [value] in a one-process run)."""
    if not info.distributed:
        return [value]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, value)
    return out


def _agree(info: DistInfo, path: Path, reason: str | None, damaged: bool = True) -> None:
    """Raise UnusableCheckpointError on every rank when any rank found a `reason` not to use `path`, so
    that all ranks skip the same checkpoints and load the same one."""
    reasons = [r for r in _gather(info, reason) if r is not None]
    if reasons:
        raise UnusableCheckpointError(path, reasons[0], damaged)


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


def file_checksum(path: Path, algorithm: str = CHECKSUM) -> tuple[int, str]:
    """(size in bytes, hex digest) of a file, read in chunks."""
    digest = hashlib.new(algorithm)
    size = 0
    buf = bytearray(_READ_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


def _write_manifest(directory: Path, info: DistInfo) -> None:
    """Checksum every file of a written checkpoint (the ranks share the work) and write manifest.json on
    the main rank. Every file is listed, whichever rank or library wrote it, so nothing depends on how
    DCP names its files."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file()) if info.is_main else None
    if info.distributed:  # the main rank's listing, so that every rank hashes its share of the same list
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    assert names is not None
    mine = {}
    for name in names[info.rank :: info.world_size]:
        size, digest = file_checksum(directory / name)
        mine[name] = {"bytes": size, CHECKSUM: digest}
    files: dict[str, Any] = {}
    for part in _gather(info, mine):
        files.update(part)
    if info.is_main:
        manifest = {"checksum": CHECKSUM, "files": dict(sorted(files.items()))}
        atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1) + "\n")


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
        # `manifest` tells a reader that this checkpoint has one: a missing manifest.json is then damage,
        # not a checkpoint from before manifests.
        atomic_write_text(partial / TRAINER_STATE,
                          json.dumps({**trainer_state, "world_size": info.world_size, "manifest": MANIFEST}))
    _barrier(info)
    _write_manifest(partial, info)
    if info.is_main:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        complete = sorted(p for p in root.glob("step-*") if not p.name.endswith(".partial"))
        for old in complete[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier(info)
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's finished checkpoints (damaged or not), oldest first."""
    root = checkpoint_dir(run_dir)
    return sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".partial"))


class _Damage(Exception):
    """What one rank found wrong with a checkpoint, before the ranks agree on it."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise _Damage(f"{path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Damage(f"{path.name} is not valid JSON ({e})") from None


def _check_files(path: Path, info: DistInfo) -> tuple[dict[str, Any], bool]:
    """This rank's share of verifying a checkpoint: (trainer state, whether a manifest verified it).
    Sizes are checked by every rank (a stat each); checksums are split over the ranks."""
    verified = (path / MANIFEST).exists()
    if verified:
        manifest = _read_json(path / MANIFEST)
        try:
            files = {str(name): (int(entry["bytes"]), str(entry[manifest["checksum"]]))
                     for name, entry in manifest["files"].items()}
            algorithm = hashlib.new(manifest["checksum"]).name
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise _Damage(f"{MANIFEST} is not a valid manifest ({type(e).__name__}: {e})") from None
        for name, (size, _) in sorted(files.items()):
            f = path / name
            if not f.is_file():
                raise _Damage(f"{name} is missing")
            actual = f.stat().st_size
            if actual != size:
                raise _Damage(f"{name} is {actual} bytes; {MANIFEST} says {size} (truncated or overwritten)")
        for name in sorted(files)[info.rank :: info.world_size]:
            try:
                digest = file_checksum(path / name, algorithm)[1]
            except OSError as e:  # a read error of the disk or the network file system
                raise _Damage(f"{name} cannot be read ({e})") from None
            if digest != files[name][1]:
                raise _Damage(f"{name} does not match its {algorithm} checksum (the file is corrupted)")
    trainer = _read_json(path / TRAINER_STATE)
    if not isinstance(trainer, dict) or not isinstance(trainer.get("phase"), int):
        raise _Damage(f"{TRAINER_STATE} is not a trainer state")
    if not verified:
        if trainer.get("manifest"):
            raise _Damage(f"{MANIFEST} is missing")
        if not (path / DCP_METADATA).is_file():
            raise _Damage(f"{DCP_METADATA} is missing")
    rng = f"rng-{info.rank}.pt"
    if trainer.get("world_size") == info.world_size and not (path / rng).is_file():
        # This rank's RNG state: without it the run cannot continue exactly.
        raise _Damage(f"{rng} is missing")
    return trainer, verified


def verify(path: Path, info: DistInfo) -> tuple[dict[str, Any], bool]:
    """Check a checkpoint's files before anything is loaded from them: (trainer state, whether a
    manifest verified it). Raises UnusableCheckpointError on every rank when any rank finds a fault."""
    try:
        trainer, verified = _check_files(path, info)
        reason = None
    except _Damage as e:
        trainer, verified, reason = {}, False, str(e)
    _agree(info, path, reason)
    return trainer, verified


def _floating_tensors(obj: Any, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted name, this rank's local tensor) for every floating-point tensor of a nested state dict."""
    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield prefix, obj.to_local() if isinstance(obj, DTensor) else obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _floating_tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _floating_tensors(v, f"{prefix}.{i}")


def _non_finite(state: dict[str, Any]) -> str | None:
    """The first tensor of `state` holding NaN or inf (as a reason), or None."""
    for name, t in _floating_tensors(state, ""):
        bad = count_non_finite(t)
        if bad:
            return f"{name} has {bad} non-finite values (NaN or inf) of {t.numel()}"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:300] if text else ''}"


def _dcp_failure(e: BaseException) -> str:
    """The first line of the error underneath a CheckpointException (whose own text is a list of ranks
    followed by their tracebacks), or of `e` itself."""
    if isinstance(e, CheckpointException):
        for exc, _trace in e.failures.values():
            return _first_line(exc)
    return _first_line(e)


def load(path: Path, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], info: DistInfo,
         trainer: dict[str, Any], verified: bool) -> None:
    """Restore model, optimizers and this rank's RNG from a checkpoint that `verify` passed. Raises
    UnusableCheckpointError (on every rank) when DCP cannot load it or a loaded tensor is not finite; the
    model and optimizers may then hold part of it, and a later load overwrites all of it."""
    model_sd, optim_sd = get_state_dict(model, optimizers)
    state = {"model": model_sd, "optim": optim_sd}
    reason = None
    try:
        with _single_process_quiet(info):
            dcp.load(state, checkpoint_id=str(path))
    # Whatever DCP's readers raise on a broken file (the zip reader's RuntimeError, EOFError, unpickling
    # errors; CheckpointException, a BaseException, wraps them), this checkpoint cannot be resumed from;
    # -v logs the trace.
    except (Exception, CheckpointException) as e:
        log.debug("loading %s failed", path, exc_info=True)
        reason = f"DCP cannot load it ({_dcp_failure(e)})"
        if verified:  # intact files that do not fit: the model or optimizer differs from the one saved
            reason += f"; its files match {MANIFEST}: did the recipe's model or optimizer change?"
    # "Cannot be loaded", not "damaged": files that verify do not fit this model, and without a manifest
    # either may be the case. Called on every rank, also those where DCP succeeded.
    _agree(info, path, reason, damaged=False)
    # A checksum catches a file changed after it was written; this catches state that was written
    # non-finite (or an unverified checkpoint's flipped bits), which would otherwise surface steps later
    # as a diverged loss.
    _agree(info, path, _non_finite(state))
    rng, reason = None, None
    rng_file = path / f"rng-{info.rank}.pt"
    if trainer.get("world_size") == info.world_size:  # the same on every rank: one trainer.json
        try:
            rng = torch.load(rng_file, weights_only=False)
        except Exception as e:  # noqa: BLE001 - as above: an unreadable file, whatever the unpickler raises
            reason = f"{rng_file.name} cannot be read ({_first_line(e)})"
        _agree(info, path, reason)
    set_state_dict(model, optimizers, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if rng is not None:
        set_rng_state(rng)


def resume(run_dir: Path, model: nn.Module, optimizers: Sequence[torch.optim.Optimizer], info: DistInfo,
           before_load: Callable[[dict[str, Any]], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest usable checkpoint of the run: (its path, the trainer state), or None when the run
    has none. Checkpoints that cannot be used are reported and skipped; CheckpointError when none can.
    `before_load(trainer_state)` runs before a checkpoint's tensors are loaded (the caller sets up what
    depends on the phase, such as RoPE)."""
    candidates = complete_checkpoints(run_dir)
    failures: list[UnusableCheckpointError] = []
    for i, path in enumerate(reversed(candidates)):
        try:
            trainer, verified = verify(path, info)
            if not verified and info.is_main:
                log.warning("%s has no %s (written before checkpoints were checksummed); "
                            "its files are not verified", path, MANIFEST)
            if before_load is not None:
                before_load(trainer)
            load(path, model, optimizers, info, trainer, verified)
        except UnusableCheckpointError as e:
            failures.append(e)
            if info.is_main and i + 1 < len(candidates):
                log.warning("%s; falling back to the previous checkpoint", e)
            continue
        return path, trainer
    if not failures:
        return None
    raise CheckpointError(
        f"cannot resume: no checkpoint in {checkpoint_dir(run_dir)} can be used ("
        + "; ".join(e.what for e in failures)
        + "); restore one, or move the directory away to train from the start")
