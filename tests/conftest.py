from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from afm.model import ModelConfig, YarnScaling, build_model
from afm.model.hf import save_pretrained

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("AFM_TEST_CACHE", Path.home() / ".cache" / "afm-tests"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        dtype="float32",
    )
    base.update(overrides)
    return ModelConfig(**base)


YARN = YarnScaling(factor=8.0, original_max_position_embeddings=64)


@pytest.fixture
def tiny_model():
    return build_model(tiny_config(), seed=0).eval()


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = build_model(tiny_config(), seed=0).eval()
    out = tmp_path / "ckpt"
    save_pretrained(model, out)
    return out, model


def python() -> str:
    return sys.executable


def fetch_pypi_sdist(name: str, version: str) -> Path:
    """Download a source distribution from PyPI into the test cache (once); skip the test if unreachable."""
    import subprocess

    dest = CACHE / "sdists"
    dest.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('-', '_')}-{version}"
    found = sorted(dest.glob(f"{stem}.tar.gz"))
    if found:
        return found[0]
    cmd = [python(), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dest), f"{name}=={version}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    found = sorted(dest.glob(f"{stem}.tar.gz"))
    if result.returncode != 0 or not found:
        pytest.skip(f"cannot download {name}=={version} from PyPI: {result.stderr.strip()[-300:]}")
    return found[0]


def extract_member(archive: Path, member_suffix: str) -> Path:
    """Extract one file (matched by path suffix) from a .tar.gz into the test cache."""
    import tarfile

    out = CACHE / "extracted" / archive.name / member_suffix
    if out.exists():
        return out
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if m.name.endswith(member_suffix) and m.isfile():
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_suffix(out.suffix + ".part")
                with tar.extractfile(m) as src, open(tmp, "wb") as dst:  # type: ignore[union-attr]
                    dst.write(src.read())
                tmp.rename(out)
                return out
    raise FileNotFoundError(f"{member_suffix} not in {archive}")


LLAMA_CPP_PYTHON_VERSION = "0.3.36"


@pytest.fixture(scope="session")
def llama_cpp():
    """llama.cpp through llama-cpp-python: the installed one, or built once from PyPI into the test cache."""
    import importlib
    import subprocess

    try:
        return importlib.import_module("llama_cpp")
    except ImportError:
        pass
    target = CACHE / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    if not (target / "llama_cpp").exists():
        wheels = CACHE / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        found = sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-*.whl"))
        if not found:
            env = {**os.environ, "CMAKE_ARGS": "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF"}
            cmd = [python(), "-m", "pip", "wheel", "--no-deps", "-w", str(wheels),
                   f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
            found = sorted(wheels.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}-*.whl"))
            if result.returncode != 0 or not found:
                pytest.skip(f"llama-cpp-python could not be built from PyPI: {result.stderr.strip()[-400:]}")
        cmd = [python(), "-m", "pip", "install", "--no-deps", "--target", str(target), str(found[0]), "diskcache"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"llama-cpp-python could not be installed: {result.stderr.strip()[-400:]}")
    sys.path.insert(0, str(target))
    try:
        return importlib.import_module("llama_cpp")
    except (ImportError, OSError) as e:
        pytest.skip(f"llama-cpp-python was built but does not load: {e}")
