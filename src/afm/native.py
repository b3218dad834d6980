"""afm's C++ CPU kernels, compiled on first use for the machine that runs them.

Each kernel source (`afm/quant/csrc/quant_kernels.cpp`, `afm/model/csrc/attention_cpu.cpp`) becomes a
PyTorch extension built by `torch.utils.cpp_extension` with `-O3 -march=native`, so it uses the
instructions this CPU has. The build is cached in torch's extensions directory (`TORCH_EXTENSIONS_DIR`,
by default ~/.cache/torch_extensions) under a name that hashes the source, the compiler flags, the
torch version and this CPU's feature flags: machines sharing a home directory never load each other's
binaries. When no compiler is present or the build fails, the extension is unavailable, the reason is
logged and kept, and callers use their PyTorch fallback.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def cpu_signature() -> str:
    """The CPU's feature flags (what -march=native compiles for) and model name, from /proc/cpuinfo."""
    keys = ("flags", "features", "model name", "cpu model")  # x86 and ARM spellings
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in keys and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    fields = "|".join(f"{k}={v}" for k, v in sorted(found.items()))
    return f"{platform.machine()}|{platform.processor()}|{fields}"


def openmp_flags() -> list[str]:
    """-fopenmp when torch's intra-op thread pool is OpenMP's. at::parallel_for is inline: compiled
    without -fopenmp it silently runs serially. The extension then needs libgomp.so.1, which resolves to
    the copy torch has already loaded, so both share one pool and torch.set_num_threads applies."""
    return ["-fopenmp"] if "parallel backend: OpenMP" in torch.__config__.parallel_info() else []


class CppExtension:
    """One C++ source built into `torch.ops.<name>` on first use; `ops` is None when it cannot be built.

    `cflags_env` names an environment variable whose value replaces `default_cflags` (e.g.
    `-O3 -march=haswell` to build an older instruction set's path on a newer machine).
    """

    def __init__(self, prefix: str, source: Path, default_cflags: tuple[str, ...], cflags_env: str,
                 what: str) -> None:
        self.prefix = prefix
        self.source = source
        self.default_cflags = default_cflags
        self.cflags_env = cflags_env
        self.what = what  # for log lines: "quantized CPU kernels"
        self._lock = threading.Lock()
        self._ops: Any = None
        self.error: str | None = None

    def cflags(self) -> list[str]:
        return (os.environ.get(self.cflags_env, "").split() or list(self.default_cflags)) + openmp_flags()

    def name(self) -> str:
        """The name the extension is built and cached under: unique per source, flags, torch and CPU."""
        h = hashlib.sha256()
        for part in (self.source.read_bytes(), " ".join(self.cflags()).encode(), torch.__version__.encode(),
                     os.environ.get("CXX", "").encode(), cpu_signature().encode()):
            h.update(part)
            h.update(b"\0")
        return f"{self.prefix}_{h.hexdigest()[:16]}"

    @property
    def ops(self) -> Any:
        """The extension's `torch.ops` namespace (building it on the first call), or None with `error` set."""
        if self._ops is not None or self.error is not None:
            return self._ops
        with self._lock:
            if self._ops is None and self.error is None:
                name = self.name()
                try:
                    from torch.utils import cpp_extension

                    cpp_extension.load(name=name, sources=[str(self.source)], extra_cflags=self.cflags(),
                                       extra_ldflags=openmp_flags(), is_python_module=False, verbose=False)
                    self._ops = getattr(torch.ops, name)
                    log.info("%s loaded: %s (%s)", self.what, name, self._ops.isa())
                except Exception as e:  # any failure (no compiler, no ninja, a compile error): callers fall back
                    self.error = f"building the C++ extension {name} failed: {type(e).__name__}: {e}".strip()
                    log.warning("%s unavailable, callers fall back to PyTorch: %s", self.what, self.error)
        return self._ops
