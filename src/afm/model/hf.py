"""Checkpoints in the Hugging Face layout.

A checkpoint directory holds `config.json`, `generation_config.json`, sharded safetensors
(`model-0000N-of-0000M.safetensors` plus `model.safetensors.index.json`; a single `model.safetensors`
is read too) and the tokenizer files. transformers, vLLM and llama.cpp's converter read it as is.

Loading builds the model on the meta device and streams tensors one at a time from memory-mapped
safetensors files, so peak memory stays close to the size of the weights. Every tensor's name, shape
and dtype is checked against the config before any data is read, and every tensor is checked for NaN
and infinite values as it is read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from afm.errors import CheckpointError, ConfigError
from afm.io import atomic_write, atomic_write_text
from afm.model.config import ModelConfig
from afm.model.transformer import AFMForCausalLM, build_model, torch_dtype

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

# AFM-4.5B's recommended sampling (its model card).
AFM_SAMPLING: dict[str, Any] = {"temperature": 0.5, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1}

_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# --------------------------------------------------------------------------------------------
# Saving


def checkpoint_tensors(model: AFMForCausalLM) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores, under their Hugging Face names (a tied head is stored once)."""
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def _plan_shards(tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def save_weights(
    model: AFMForCausalLM, directory: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[Path]:
    """Write the weights as sharded safetensors plus `model.safetensors.index.json`.

    Each shard is written to a temporary file and renamed into place; the index is written last, so a
    reader never sees an index that names a shard that is not complete. Shards of an earlier save that
    the new index does not name are removed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(model)
    plan = _plan_shards(tensors, max_shard_bytes)
    total = len(plan)
    weight_map: dict[str, str] = {}
    written: list[Path] = []
    for i, names in enumerate(plan, start=1):
        fname = f"model-{i:05d}-of-{total:05d}.safetensors"
        shard = {n: tensors[n].detach().to("cpu").contiguous() for n in names}
        atomic_write(directory / fname, lambda tmp, shard=shard: save_file(shard, str(tmp), metadata={"format": "pt"}))
        del shard
        weight_map.update({n: fname for n in names})
        written.append(directory / fname)
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    atomic_write_text(directory / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    keep = {p.name for p in written}
    for old in directory.glob("model-*-of-*.safetensors"):
        if old.name not in keep:
            old.unlink()
    (directory / SINGLE_FILE).unlink(missing_ok=True)
    return written


def generation_config_dict(config: ModelConfig, eos_token_ids: list[int] | None = None) -> dict[str, Any]:
    eos = eos_token_ids if eos_token_ids is not None else config.eos_token_ids
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": config.pad_token_id,
        "do_sample": True,
        **AFM_SAMPLING,
    }


def save_pretrained(
    model: AFMForCausalLM,
    directory: str | Path,
    tokenizer: Any | None = None,
    *,
    generation_config: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Save a complete checkpoint: weights, config.json, generation_config.json and the tokenizer."""
    directory = Path(directory)
    save_weights(model, directory, max_shard_bytes)
    config = model.config
    if config.dtype != _dtype_name(model.dtype):
        config = config.replace(dtype=_dtype_name(model.dtype))
    stop_ids = None
    if tokenizer is not None:
        # Special-token ids the config leaves open come from the tokenizer saved with it, so transformers
        # and other runtimes know them too; generation stops at every id that ends a turn.
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
        missing = {k: v for k, v in ids.items() if getattr(config, k) is None and v is not None}
        if missing:
            config = config.replace(**missing)
        stop_ids = list(dict.fromkeys([*config.eos_token_ids, *tokenizer.stop_token_ids]))
    config.save_pretrained(directory)
    gen = generation_config if generation_config is not None else generation_config_dict(config, stop_ids)
    atomic_write_text(directory / GENERATION_CONFIG_FILE, json.dumps(gen, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.items():
        if d == dtype:
            return name
    raise ConfigError(f"unsupported model dtype {dtype}")


# --------------------------------------------------------------------------------------------
# Loading


def read_generation_config(directory: str | Path) -> dict[str, Any]:
    """`generation_config.json` as a dict ({} when the checkpoint has none)."""
    path = Path(directory) / GENERATION_CONFIG_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def weight_files(directory: Path) -> dict[Path, list[str] | None]:
    """The safetensors files of a checkpoint, each with the tensor names its index assigns (None: no index)."""
    index_path = directory / INDEX_FILE
    if index_path.exists():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e})") from e
        files: dict[Path, list[str] | None] = {}
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or Path(fname).name != fname:
                raise CheckpointError(f"{index_path}: tensor {name!r} maps to an invalid file name {fname!r}")
            files.setdefault(directory / fname, []).append(name)  # type: ignore[union-attr]
        for path in files:
            if not path.exists():
                raise CheckpointError(
                    f"{path}: missing; {INDEX_FILE} assigns tensors to it. The checkpoint is incomplete: "
                    "copy or download the missing shard."
                )
        return files
    single = directory / SINGLE_FILE
    if single.exists():
        return {single: None}
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        raise CheckpointError(
            f"{directory}: holds PyTorch pickle weights (.bin/.pt); afm reads safetensors only. Convert with "
            "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)"
        )
    raise CheckpointError(f"{directory}: no {INDEX_FILE} or {SINGLE_FILE} found; is this a checkpoint directory?")


def _open(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        size = path.stat().st_size
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({e}); the file is {size} bytes. It may be truncated or "
            "corrupted: copy it again."
        ) from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e})") from e


def iter_checkpoint_tensors(
    directory: Path, expected: dict[str, torch.Size], optional: dict[str, torch.Size] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, after checking the names, shapes and dtypes of all of them.

    Tensors named in `optional` are checked when present but not yielded.
    """
    optional = optional or {}
    known = {**expected, **optional}
    files = weight_files(directory)
    seen: dict[str, Path] = {}
    unexpected: list[str] = []
    for path, indexed in files.items():
        with _open(path) as f:
            keys = set(f.keys())
            if indexed is not None:
                absent = sorted(set(indexed) - keys)
                if absent:
                    raise CheckpointError(
                        f"{path}: {INDEX_FILE} says it holds {absent[:5]}, but it does not; "
                        "the index and the shard disagree"
                    )
            for name in sorted(keys):
                if name in seen:
                    raise CheckpointError(f"{path}: tensor {name!r} is also in {seen[name]}")
                seen[name] = path
                if name not in known:
                    unexpected.append(name)
                    continue
                sl = f.get_slice(name)
                dtype = sl.get_dtype()
                if dtype not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has dtype {dtype}; model weights must be F32, F16 or BF16"
                    )
                shape = torch.Size(sl.get_shape())
                if shape != known[name]:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has shape {tuple(shape)}, but config.json implies "
                        f"{tuple(known[name])}; the weights and config.json do not belong together"
                    )
    missing = sorted(set(expected) - set(seen))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{directory}: checkpoint is missing tensor(s) {missing[:5]}{more}")
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise CheckpointError(
            f"{directory}: unexpected tensor(s) {sorted(unexpected)[:5]}{more} in {seen[unexpected[0]].name}; "
            "they are not part of an AFM model with this config.json"
        )
    for path in files:
        with _open(path) as f:
            for name in sorted(set(f.keys()) & set(expected)):
                try:
                    tensor = f.get_tensor(name)
                except SafetensorError as e:
                    raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from e
                # A NaN or inf weight makes every output garbage without any error; refuse it here, where
                # the tensor is read anyway, rather than serve it.
                bad = count_non_finite(tensor)
                if bad:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has {bad} non-finite values (NaN or inf) of {tensor.numel()}; "
                        "the checkpoint is damaged (copy it again, or export it from an earlier training checkpoint)"
                    )
                yield name, tensor


def count_non_finite(tensor: torch.Tensor) -> int:
    """How many elements of a floating-point tensor are NaN or infinite.

    The screen is one aminmax pass, which carries any NaN or infinity into its result and allocates
    nothing the size of the tensor (25x faster than isfinite(t).all() on a CPU, docs/benchmarks.md).
    Only a tensor that fails it is counted element by element.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return 0
    lo, hi = torch.aminmax(tensor)
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return 0
    flat = tensor.reshape(-1)
    return sum(int(torch.isfinite(chunk).logical_not_().sum()) for chunk in flat.split(1 << 24))


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    if isinstance(old, nn.Parameter):
        setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(module, attr, value)


def load_pretrained(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> AFMForCausalLM:
    """Load a checkpoint directory (local only) onto `device` in `dtype` (default: config.json's).

    Tensors are streamed one by one from memory-mapped files; on the CPU in the checkpoint's own dtype
    no copy is made at all.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory; afm loads checkpoints from local directories")
    config = ModelConfig.from_pretrained(directory)
    dtype = dtype or torch_dtype(config.dtype)
    device = torch.device(device)
    model = build_model(config, "meta", dtype)
    expected = {k: v.shape for k, v in checkpoint_tensors(model).items()}
    # Some exporters store a tied head as well; it is accepted and ignored.
    optional = {"lm_head.weight": model.lm_head.weight.shape} if config.tie_word_embeddings else {}
    loaded = 0
    for name, tensor in iter_checkpoint_tensors(directory, expected, optional):
        _set_tensor(model, name, tensor.to(device=device, dtype=dtype))
        loaded += 1
    model.tie_weights()
    rotary = model.model.rotary_emb
    rotary.inv_freq = torch.empty(rotary.inv_freq.shape, device=device)
    rotary.reset_parameters()
    log.info("loaded %d tensors from %s", loaded, directory)
    return model.eval()


def tensor_summary(directory: str | Path) -> tuple[int, int, int, list[str]]:
    """(parameters, weight bytes, weight files, stored dtypes), read from the safetensors headers only."""
    files = weight_files(Path(directory))
    n_params, dtypes = 0, set()
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                sl = f.get_slice(name)
                shape = sl.get_shape()
                numel = 1
                for d in shape:
                    numel *= d
                n_params += numel
                dtypes.add(sl.get_dtype())
    n_bytes = sum(p.stat().st_size for p in files)
    return n_params, n_bytes, len(files), sorted(dtypes)


def checkpoint_size_bytes(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in weight_files(Path(directory)))


def directory_size_bytes(directory: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


__all__ = [
    "save_pretrained",
    "save_weights",
    "load_pretrained",
    "read_generation_config",
    "generation_config_dict",
    "checkpoint_size_bytes",
    "count_non_finite",
    "AFM_SAMPLING",
]
