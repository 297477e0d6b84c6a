import pytest

from s2d_ray.errors import ModelError
from s2d_ray.models import EMBEDDED, find_gguf, is_complete, resolve_model


def test_model_path_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="config.json missing"):
        resolve_model("smollm2", str(tmp_path))
    with pytest.raises(ModelError, match="not an embedded model"):
        resolve_model("llama-9000", None)


def test_incomplete_folder_is_not_complete(tmp_path):
    assert not is_complete(tmp_path)
    (tmp_path / ".s2d-complete.json").write_text('{"files": {"model.safetensors": 10}}')
    assert not is_complete(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    assert is_complete(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x" * 3)  # truncated
    assert not is_complete(tmp_path)


def test_missing_package_is_named():
    fake = EMBEDDED["smollm2"].__class__("x", "no-such-package-s2d", "x.gguf", "x", "x")
    with pytest.raises(ModelError, match="no-such-package-s2d is not installed"):
        find_gguf(fake)


def test_corrupt_gguf_is_a_clear_error_and_leaves_no_folder(tmp_path, monkeypatch):
    from s2d_ray import models

    bad = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    bad.write_bytes(b"GGUF" + b"\0garbage" * 100)
    monkeypatch.setenv("S2D_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "find_gguf", lambda m: bad)
    with pytest.raises(ModelError, match="could not convert"):
        models.prepare("smollm2", log=lambda *_: None)
    assert not models.embedded_path("smollm2").exists()
