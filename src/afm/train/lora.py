"""LoRA (Hu et al. 2021): low-rank adapters on chosen linear layers, applied from outside the model.

`apply_lora` swaps each targeted `nn.Linear` for a `LoRALinear` that keeps the frozen base weight under
the same name (`...q_proj.weight`) and adds `lora_A` (r x in, Kaiming-uniform) and `lora_B` (out x r,
zeros, so training starts from the base model): y = x W^T + (alpha / r) * x A^T B^T. Only A and B train.

For export the adapters are merged into the base weights (`merge_into`), giving a plain checkpoint that
loads anywhere; `save_peft_adapter` also writes the adapters alone in the layout `peft` loads
(`adapter_config.json`, `adapter_model.safetensors`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from afm.errors import ConfigError
from afm.io import atomic_write, atomic_write_text

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


@dataclass
class LoRASpec:
    r: int = 16
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"lora.targets {unknown or self.targets} are not projections; choose from {TARGETS}")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=base.weight.device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=base.weight.device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scale = alpha / r

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight) + self.lora_B(self.lora_A(x)) * self.scale

    def delta(self) -> Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale


def apply_lora(model: nn.Module, spec: LoRASpec) -> list[str]:
    """Replace the targeted projections with LoRA layers and freeze everything else; returns their names."""
    spec.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in spec.targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, spec.r, spec.alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ConfigError(f"no module matched lora.targets {spec.targets}")
    return wrapped


def lora_prefixes(state: dict[str, Tensor]) -> list[str]:
    return sorted(k[: -len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight"))


def merge_into(state: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """A plain state dict from one with LoRA adapters: W + scale * B @ A for every adapted layer."""
    merged = {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}
    for prefix in lora_prefixes(state):
        a, b = state[f"{prefix}.lora_A.weight"].float(), state[f"{prefix}.lora_B.weight"].float()
        base = merged[f"{prefix}.weight"]
        merged[f"{prefix}.weight"] = (base.float() + scale * (b @ a)).to(base.dtype)
    return merged


def save_peft_adapter(state: dict[str, Tensor], spec: LoRASpec, out: Path, base_model: str | None) -> Path:
    """The adapters alone, as peft saves them (`PeftModel.from_pretrained(base, out)` loads them)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"base_model.model.{k}": v.detach().float().contiguous().cpu()
               for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
    atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.r, "lora_alpha": spec.alpha,
              "target_modules": list(spec.targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "inference_mode": True, "base_model_name_or_path": base_model}
    atomic_write_text(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return out
