"""Learning-rate schedules as pure functions of the step."""

from __future__ import annotations

import math


def warmup_steps(warmup: float, total: int) -> int:
    """`warmup` is a fraction of the phase (< 1) or a step count (>= 1)."""
    return int(warmup) if warmup >= 1 else round(warmup * total)


def lr_at(step: int, total: int, peak: float, min_ratio: float, schedule: str, warmup: float, decay: float) -> float:
    """Learning rate at `step` (0-based) of a phase of `total` steps.

    - linear warmup from peak/warmup to peak over the warmup steps;
    - "wsd" (warmup-stable-decay, as in MiniCPM and DeepSeek): stay at peak, then decay linearly to
      `min_ratio * peak` over the last `decay` fraction of the phase;
    - "cosine": cosine from peak to `min_ratio * peak` over the steps after warmup.
    """
    w = warmup_steps(warmup, total)
    low = peak * min_ratio
    if step < w:
        return peak * (step + 1) / w
    if schedule == "cosine":
        progress = (step - w) / max(1, total - w)
        return low + (peak - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    d = round(decay * total)
    start = total - d
    if step < start or d == 0:
        return peak
    return peak - (peak - low) * (step - start + 1) / d
