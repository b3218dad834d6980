"""Host-to-device copies that never make the host wait for the device.

A copy from pageable host memory to a GPU waits until every kernel already queued on the stream has
finished (CUDA's rule for pageable transfers, which `non_blocking=True` does not lift). In the engine
that would stall the host right after it launches a step's forward, at the first small upload that
follows it (the sampler's per-row parameters, the rows to send through the LM head): the host then
dispatches the sampler while the GPU sits idle. Staged in pinned memory, the copy is queued like a
kernel; PyTorch's caching host allocator keeps the pinned block until the copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def staged(t: Tensor, device: torch.device) -> Tensor:
    """Host tensor `t` ready for a non-blocking copy to `device`: in pinned memory when that is a GPU."""
    return t.pin_memory() if device.type == "cuda" else t


def to_device(data: np.ndarray | Sequence[int] | Sequence[float] | Tensor, device: torch.device,
              dtype: torch.dtype | None = None) -> Tensor:
    """`data` (a numpy array, a list or a host tensor) on `device`, without waiting for queued GPU work."""
    t = data if isinstance(data, Tensor) else torch.as_tensor(data, dtype=dtype)
    if device.type == "cpu":
        return t  # already there: the CPU engine's path, where a `.to` per upload is measurable
    return staged(t, device).to(device, non_blocking=True)


def copy_to_device(dst: Tensor, src: np.ndarray) -> None:
    """Fill device tensor `dst` from host array `src`, without waiting for queued GPU work."""
    dst.copy_(staged(torch.from_numpy(src), dst.device), non_blocking=True)


def to_host(t: Tensor) -> Tensor:
    """`t` on the host without waiting for queued GPU work: the copy lands in pinned memory when the
    device gets to it, so read the result only after an event recorded after this call has completed."""
    return t if t.device.type == "cpu" else t.to("cpu", non_blocking=True)
