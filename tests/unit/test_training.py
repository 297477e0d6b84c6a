"""Training pieces without DeepSpeed: the streamed export's files (safetensors written
straight from tensor memory read back identically; shards keep a module whole) and the LR schedule."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from s2d_ray.training import _ShardWriter, write_safetensors


def test_safetensors_written_from_memory_read_back_identically(tmp_path):
    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32": torch.randn(7),
        "f16": torch.randn(2, 2, 2).half(),
        "i64": torch.arange(4),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6)[:, ::2],  # not contiguous
    }
    path = tmp_path / "x.safetensors"
    write_safetensors(path, tensors)
    back = load_file(path)
    assert set(back) == set(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape and torch.equal(back[name], t), name
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert (path.stat().st_mode & 0o044) == 0o044  # group- and world-readable (shared volumes)


def test_unknown_dtype_is_refused(tmp_path):
    with pytest.raises(KeyError):
        write_safetensors(tmp_path / "x.safetensors", {"c": torch.zeros(2, dtype=torch.complex64)})


def test_shards_fill_up_to_the_limit_but_never_split_a_module(tmp_path):
    writer = _ShardWriter(tmp_path, shard_bytes=100)
    writer.add_module({"a.w": torch.zeros(10), "a.b": torch.zeros(10)})  # 80 bytes
    writer.add_module({"b.w": torch.zeros(10)})  # would pass 100: a new shard
    writer.add_module({"c.w": torch.zeros(40)})  # bigger than a shard on its own: alone
    files = writer.close()
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4 * 70
    assert index["weight_map"] == {
        "a.b": files[0].name, "a.w": files[0].name, "b.w": files[1].name, "c.w": files[2].name,
    }  # fmt: skip
    assert not list(tmp_path.glob(".shard-*"))


def test_one_shard_is_named_like_transformers_single_file(tmp_path):
    writer = _ShardWriter(tmp_path, shard_bytes=2**30)
    writer.add_module({"w": torch.ones(3, dtype=torch.bfloat16)})
    assert [f.name for f in writer.close()] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert writer.dtypes == {torch.bfloat16}


def test_the_learning_rate_is_used_from_the_first_step():
    from s2d_ray.training import lr_factor

    assert [lr_factor(s, 0, 3) for s in range(3)] == [1.0, 2 / 3, 1 / 3]  # the paper's 3 last-letter steps
    assert [lr_factor(s, 2, 4) for s in range(4)] == [0.5, 1.0, 1.0, 0.5]
