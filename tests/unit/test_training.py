"""Training pieces without DeepSpeed: the streamed export's files (safetensors written
straight from tensor memory read back identically; shards keep a module whole) and the LR schedule."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from s2d_ray.training.export import ShardWriter, write_safetensors


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
    writer = ShardWriter(tmp_path, shard_bytes=100)
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
    writer = ShardWriter(tmp_path, shard_bytes=2**30)
    writer.add_module({"w": torch.ones(3, dtype=torch.bfloat16)})
    assert [f.name for f in writer.close()] == ["model.safetensors"]
    assert not (tmp_path / "model.safetensors.index.json").exists()
    assert writer.dtypes == {torch.bfloat16}


def test_the_learning_rate_is_used_from_the_first_step():
    from s2d_ray.training import lr_factor

    assert [lr_factor(s, 0, 3) for s in range(3)] == [1.0, 2 / 3, 1 / 3]  # the paper's 3 last-letter steps
    assert [lr_factor(s, 2, 4) for s in range(4)] == [0.5, 1.0, 1.0, 0.5]


def _rows(*lengths):
    return [([7] * n, [7] * n) for n in lengths]


def test_micro_batches_are_cut_from_length_sorted_windows_in_a_seeded_order():
    from s2d_ray.training import bucketed

    batches = bucketed(_rows(5, 1, 3, 2, 4, 6), size=2, max_tokens=None, seed=0)
    assert sorted(sorted(len(ids) for ids, _ in b) for b in batches) == [[1, 2], [3, 4], [5, 6]]
    padded = sum(len(b) * max(len(ids) for ids, _ in b) for b in batches)
    assert padded == 2 * (2 + 4 + 6) < 2 * (5 + 3 + 6)  # unsorted pairs (5,1) (3,2) (4,6) would pad to 5, 3, 6
    assert batches == bucketed(_rows(5, 1, 3, 2, 4, 6), size=2, max_tokens=None, seed=0)  # resumable
    orders = {tuple(len(b[0][0]) for b in bucketed(_rows(*range(1, 17)), 2, None, seed)) for seed in range(5)}
    assert len(orders) > 1  # the longest rows do not always come last


def test_a_token_cap_gives_long_rows_smaller_micro_batches():
    from s2d_ray.training import bucketed

    batches = bucketed(_rows(10, 10, 10, 30), size=4, max_tokens=40, seed=0)
    assert sorted(len(b) for b in batches) == [1, 3]  # three rows of 10 (30 tokens), the row of 30 alone


def test_a_worker_sees_the_same_micro_batches_on_every_pass_and_cycles():
    import pandas as pd

    from s2d_ray.config import TrainConfig
    from s2d_ray.training import micro_batches

    class Shard:
        def iter_batches(self, batch_size, batch_format, prefetch_batches):
            rows = _rows(*range(1, 11))
            for i in range(0, len(rows), batch_size):
                yield pd.DataFrame({"input_ids": [r[0] for r in rows[i : i + batch_size]],
                                    "labels": [r[1] for r in rows[i : i + batch_size]]})  # fmt: skip

    cfg = TrainConfig(micro_batch_size=2, bucket_window=2)
    stream = micro_batches(Shard(), cfg, cycle=False)
    one_pass = [sorted(len(ids) for ids, _ in b) for b in stream]
    assert sorted(one_pass) == [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]]
    forever = micro_batches(Shard(), cfg, cycle=True)
    twice = [sorted(len(ids) for ids, _ in next(forever)) for _ in range(10)]
    assert twice[:5] == one_pass and sorted(twice[5:]) == sorted(one_pass)  # same rows, reshuffled per window


class _Shard:
    """A Ray Data shard stand-in: the same rows, cut into blocks of another size per run."""

    def __init__(self, rows, block):
        self.rows, self.block = rows, block

    def iter_batches(self, batch_size, batch_format, prefetch_batches):
        import pandas as pd

        for i in range(0, len(self.rows), self.block):
            part = self.rows[i : i + self.block]
            yield pd.DataFrame({"input_ids": [r[0] for r in part], "labels": [r[1] for r in part]})


def test_each_rank_takes_its_own_rows_whatever_the_blocks():
    from s2d_ray.config import TrainConfig
    from s2d_ray.training import micro_batches

    rows = [([i] * (1 + i % 5), [i] * (1 + i % 5)) for i in range(40)]
    cfg = TrainConfig(micro_batch_size=2, bucket_window=2)

    def seen(rank, block):
        gen = micro_batches(_Shard(rows, block), cfg, cycle=True, rank=rank, world=4)
        return [[ids[0] for ids, _ in next(gen)] for _ in range(5)]  # one pass: 10 rows, 5 micro-batches

    for rank in range(4):
        first = seen(rank, 7)
        assert first == seen(rank, 13) == seen(rank, 40)  # resuming at a micro-batch count is sound
        assert sorted(i for b in first for i in b) == list(range(rank, 40, 4))  # disjoint, together all rows


def test_a_short_micro_batch_weighs_its_rows_not_a_full_micro_batch():
    import torch

    from s2d_ray.training import train_micro_batch

    class Engine:
        device = "cpu"
        backward_with = None

        def __call__(self, input_ids, attention_mask, labels):
            return type("Out", (), {"loss": torch.tensor(2.0)})()

        def backward(self, loss):
            self.backward_with = float(loss)

        def step(self):
            pass

    engine = Engine()
    loss, _ = train_micro_batch(engine, _rows(3), pad_id=0, full_rows=16)  # a bucketing remainder of one row
    assert float(loss) == 2.0 and engine.backward_with == 2.0 / 16
    train_micro_batch(engine, _rows(3, 4, 5, 6), pad_id=0, full_rows=4)
    assert engine.backward_with == 2.0


def test_a_row_longer_than_max_seq_len_is_left_out_not_cut(tmp_path):
    import pandas as pd

    from s2d_ray.training.data import tokenize_rows
    from tests.fixtures.models import make_model

    folder = make_model("llama2-chat", tmp_path / "m", weights=False)
    batch = pd.DataFrame({"id": ["a", "b"], "prompt": ["short", "long " * 200], "target": ["Answer: x", "Answer: y"]})
    out = tokenize_rows(batch, str(folder), max_len=64)
    assert list(out["id"]) == ["a"]  # cut from the left, "b" would have lost its BOS and [INST]
    assert out["input_ids"][0][0] == 1 and out["input_ids"][0][1] != 1


def test_the_training_set_comes_in_id_order_whatever_the_parts(tmp_path):
    """Every rank takes its rows from this order (micro_batches) on every run: it must not
    depend on how generation wrote its parts; a crashed write's temp file is not read."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from s2d_ray.config import TrainConfig
    from s2d_ray.training.data import tokenize_rows, tokenized_distill_set
    from tests.fixtures.models import make_model

    model = make_model("plain", tmp_path / "m", weights=False)
    distill = tmp_path / "distill"
    distill.mkdir()
    assert tokenized_distill_set(distill, model, TrainConfig()) == (None, 0)  # nothing kept: no part
    ids = [f"q{i:03d}" for i in range(40)]
    shuffled = random.Random(0).sample(ids, len(ids))
    def table(part):
        return pa.table({"id": part, "prompt": [f"word {i}" for i in part], "target": ["Answer: x"] * len(part)})

    for k in range(4):  # parts in no id order, and ids in no order within them
        pq.write_table(table(shuffled[k * 10 : (k + 1) * 10]), distill / f"part-{k}.parquet")
    pq.write_table(table(["q999"]), distill / ".part-9.parquet.tmp")
    rows, n = tokenized_distill_set(distill, model, TrainConfig())
    assert n == 40 and rows["id"].tolist() == ids
    one = tokenize_rows(table(["q007"]).to_pandas(), str(model), TrainConfig().max_seq_len)  # as a stream's rows are
    assert rows["input_ids"][7] == one["input_ids"][0] and rows["labels"][7] == one["labels"][0]
