"""Training recipes: dataclasses filled from YAML files, with `--key value` overrides.

A recipe names a model (a preset plus field overrides, or a checkpoint to start from), an optimizer
and a list of phases that run in order (pre-training, mid-training, context extension, fine-tuning):
each phase has its own data, sequence length, token budget and learning-rate schedule, and ends with a
Hugging Face export. Everything is checked before any compute: unknown keys, inconsistent values,
missing data.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from afm.errors import ConfigError

from afm.train.lora import LoRASpec

RECIPE_DIR = Path(__file__).resolve().parents[3] / "recipes"


@dataclass
class ModelSpec:
    preset: str | None = "afm-nano"
    init_from: str | None = None  # a checkpoint directory to continue from instead of a fresh model
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields


OPTIMIZERS = ("adamw", "muon")


@dataclass
class OptimSpec:
    """`name` "adamw": AdamW on every parameter. "muon": Muon (momentum orthogonalized by Newton-Schulz,
    `torch.optim.Muon`, its step scaled to an AdamW update's RMS) on the transformer layers' weight
    matrices, AdamW on the embeddings, the LM head and the norms; both follow `lr`."""

    name: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    muon_momentum: float = 0.95


@dataclass
class ContextExtension:
    """YaRN RoPE scaling switched on at the start of a phase (AFM-4.5B: 4k -> 64k)."""

    factor: float
    original_max_position_embeddings: int
    max_position_embeddings: int


@dataclass
class PhaseSpec:
    name: str
    data: str  # a token shard directory (`afm data mix`), or "sft:<path>" for conversations (SFT)
    seq_len: int = 1024
    tokens: int | None = None  # token budget; or
    steps: int | None = None
    global_batch: int = 8  # sequences per optimizer step, over all ranks
    micro_batch: int | None = None  # sequences per forward pass per rank (default: global / world)
    schedule: str = "wsd"  # "wsd" (warmup-stable-decay) or "cosine"
    warmup: float = 0.05  # fraction of steps (or an absolute count when >= 1)
    decay: float = 0.2  # WSD: fraction of steps in the final decay
    lr: float | None = None  # default: the optimizer's
    eval_every: int = 0
    eval_batches: int = 4
    holdout: int = 0  # windows held out of the data for evaluation
    context_extension: ContextExtension | None = None
    document_mask: bool = True  # keep packed documents from attending to each other
    truncate: bool = False  # SFT: cut conversations longer than a row instead of skipping them
    export: bool = True


@dataclass
class TrainConfig:
    name: str = "run"
    out_dir: str = "runs/{name}"
    model: ModelSpec = field(default_factory=ModelSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    phases: list[PhaseSpec] = field(default_factory=list)
    seed: int = 0
    device: str | None = None
    precision: str = "auto"  # auto: bf16 compute (fp32 master weights) on GPUs, fp32 on CPU; see loop.use_bf16
    activation_checkpointing: bool = False
    compile: bool = False
    checkpoint_every: int = 0  # steps; 0 = only at the end of each phase
    keep_last: int = 2
    log_every: int = 1
    tensorboard: bool = False
    tokenizer: str | None = None  # tokenizer directory for exports (default: the data's or the init checkpoint's)
    lora: LoRASpec | None = None  # train low-rank adapters instead of every weight (merged into exports)

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir.format(name=self.name))


# ---- loading and overriding -----------------------------------------------------------------


def _build(cls: Any, data: Any, where: str) -> Any:
    """Build dataclass `cls` from plain data, refusing unknown keys with the path to them."""
    if data is None:
        return None
    origin = get_origin(cls)
    if origin is list:
        (inner,) = get_args(cls)
        if not isinstance(data, list):
            raise ConfigError(f"{where}: expected a list, got {type(data).__name__}")
        return [_build(inner, item, f"{where}[{i}]") for i, item in enumerate(data)]
    if origin is not None and type(None) in get_args(cls):  # Optional[X]
        inner = next(a for a in get_args(cls) if a is not type(None))
        return _build(inner, data, where)
    if origin is tuple:
        return tuple(data)
    if origin is dict:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
        return dict(data)
    if dataclasses.is_dataclass(cls):
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: expected a mapping, got {data!r}")
        hints = get_type_hints(cls)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: _build(hints[k], v, f"{where}.{k}") for k, v in data.items()})
    if cls is float and isinstance(data, int | str):
        try:
            return float(data)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {data!r}") from None
    if cls is int and isinstance(data, str) and data.replace("_", "").isdigit():
        return int(data.replace("_", ""))
    return data


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def recipe_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    candidate = RECIPE_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(q.stem for q in RECIPE_DIR.glob("*.yaml")) if RECIPE_DIR.exists() else []
    raise ConfigError(f"no recipe {name_or_path!r}: not a .yaml file, and not one of {known}")


def _parse_value(text: str) -> Any:
    value = yaml.safe_load(text)
    return text if value is None and text not in ("null", "~", "") else value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--a.b.c value` (or `--a.b.c=value`) overrides; list indices allowed: `--phases.0.steps 100`."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(overrides):
        key = overrides[i]
        if not key.startswith("--"):
            raise ConfigError(f"expected an option like --optim.lr, got {key!r}")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(overrides):
            raw = overrides[i + 1]
            i += 2
        else:
            raise ConfigError(f"{key} has no value: write '{key} VALUE' or '{key}=VALUE'")
        pairs.append((key, raw))
    for key, raw in pairs:
        parts = key[2:].replace("-", "_").split(".")
        node: Any = data
        for part in parts[:-1]:
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--{'.'.join(parts)}: {part!r} is not an index of a list of {len(node)}")
                node = node[int(part)]
            else:
                if node.get(part) is None:  # absent or null: start a mapping
                    node[part] = {}
                node = node[part]
        last = parts[-1]
        if isinstance(node, list):
            node[int(last)] = _parse_value(raw)
        else:
            node[last] = _parse_value(raw)
    return data


def read_recipe(name_or_path: str, overrides: list[str] | None = None) -> tuple[Path, dict[str, Any]]:
    """A recipe's YAML (recipes/NAME.yaml or a file) as plain data, with `--key value` overrides applied."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys to values")
    return path, apply_overrides(data, overrides or [])


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> TrainConfig:
    path, data = read_recipe(name_or_path, overrides)
    if "kind" in data:  # RL recipes say which trainer runs them
        raise ConfigError(f"{path} is a {data['kind']} recipe; run it with `afm rl {data['kind']}`")
    return _build(TrainConfig, data, path.stem)


# ---- validation -----------------------------------------------------------------------------------


def phase_steps(phase: PhaseSpec) -> int:
    if phase.steps is not None:
        return phase.steps
    assert phase.tokens is not None
    return max(1, math.ceil(phase.tokens / (phase.global_batch * phase.seq_len)))


def validate(config: TrainConfig, world_size: int = 1, check_data: bool = True) -> None:
    """Everything that can be checked before compute; raises ConfigError with the field named."""
    from afm.model.config import get_preset

    if not config.phases:
        raise ConfigError("the recipe has no phases")
    if config.lora is not None:
        config.lora.validate()
    if config.optim.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name must be one of {list(OPTIMIZERS)}, got {config.optim.name!r}")
    if config.optim.name == "muon" and config.lora is not None:
        raise ConfigError("optim.name muon orthogonalizes whole weight matrices; LoRA adapters train with adamw")
    if not 0 <= config.optim.muon_momentum < 1:
        raise ConfigError(f"optim.muon_momentum must be in [0, 1), got {config.optim.muon_momentum}")
    if config.precision not in ("auto", "bf16-native", "bf16", "fp32"):
        raise ConfigError(f"precision must be auto, bf16-native, bf16 or fp32, got {config.precision!r}")
    if config.model.preset is None and config.model.init_from is None:
        raise ConfigError("model: give a preset or init_from")
    if config.model.preset is not None and config.model.init_from is None:
        base = get_preset(config.model.preset)
        model_config = base.replace(**config.model.overrides) if config.model.overrides else base
    elif check_data or Path(config.model.init_from).exists():  # type: ignore[arg-type]
        from afm.model.config import ModelConfig

        model_config = ModelConfig.from_pretrained(config.model.init_from)  # type: ignore[arg-type]
    else:
        # Checking a recipe ahead of the run that makes its starting checkpoint (check_data=False):
        # the model-dependent checks wait until the checkpoint exists.
        model_config = None
    max_pos = model_config.max_position_embeddings if model_config is not None else None
    names = set()
    for i, ph in enumerate(config.phases):
        where = f"phases[{i}] ({ph.name})"
        if ph.name in names:
            raise ConfigError(f"{where}: phase names must be unique")
        names.add(ph.name)
        if (ph.tokens is None) == (ph.steps is None):
            raise ConfigError(f"{where}: give exactly one of tokens or steps")
        if ph.schedule not in ("wsd", "cosine"):
            raise ConfigError(f"{where}: schedule must be wsd or cosine, got {ph.schedule!r}")
        if ph.context_extension is not None:
            max_pos = ph.context_extension.max_position_embeddings
        if max_pos is not None and ph.seq_len > max_pos:
            raise ConfigError(
                f"{where}: seq_len {ph.seq_len} exceeds the model's RoPE range of {max_pos} positions; "
                "extend the context (context_extension) or shorten the sequence"
            )
        if ph.global_batch % world_size:
            raise ConfigError(f"{where}: global_batch {ph.global_batch} does not divide across {world_size} ranks")
        per_rank = ph.global_batch // world_size
        micro = ph.micro_batch or per_rank
        if per_rank % micro:
            raise ConfigError(f"{where}: micro_batch {micro} does not divide the per-rank batch {per_rank}")
        if check_data and not ph.data.startswith("sft:"):
            index = Path(ph.data) / "index.json"
            if not index.exists():
                raise ConfigError(f"{where}: data {ph.data!r} is not a token shard directory (no index.json); "
                                  "make one with `afm data mix`")
            meta = json.loads(index.read_text())
            tokens = meta.get("tokens", 0)
            if meta.get("vocab_size", 0) > model_config.vocab_size:
                raise ConfigError(f"{where}: {ph.data} was tokenized with a {meta['vocab_size']}-token vocabulary but "
                                  f"the model has {model_config.vocab_size}; set model.overrides.vocab_size or "
                                  "retokenize with a matching tokenizer")
            windows = max(0, (tokens - 1) // ph.seq_len) - ph.holdout
            if windows < ph.global_batch:
                raise ConfigError(f"{where}: {ph.data} holds {tokens} tokens, {max(windows, 0)} training sequences "
                                  f"of {ph.seq_len} (after {ph.holdout} held out): fewer than one global batch "
                                  f"of {ph.global_batch}")
        if check_data and ph.data.startswith("sft:") and not Path(ph.data[4:]).exists():
            raise ConfigError(f"{where}: SFT data {ph.data[4:]!r} does not exist")
