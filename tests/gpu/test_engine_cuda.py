"""vLLM on CUDA: the exported checkpoint loads and generates; a tensor-parallel engine
(Ray executor, inside our placement group, inside a Ray Data actor) runs the generation
stage when the node has two GPUs. Skipped without a CUDA build of vLLM."""

import json

import pyarrow.parquet as pq
import pytest

from tests.conftest import s2d
from tests.gpu.conftest import GPUS, LOCAL_JOB, cuda_settings, needs_cuda_vllm

pytestmark = needs_cuda_vllm


def test_the_exported_checkpoint_generates_on_cuda(cuda_trained):
    from s2d_ray.config import EngineConfig
    from s2d_ray.engine import Engine
    from s2d_ray.methods import METHODS
    from s2d_ray.methods.dataflow import PassRun, run_pass

    engine = Engine(str(cuda_trained / "model"), EngineConfig(device="cuda", gpu_memory_utilization=0.4,
                    max_model_len=1024), dtype="bfloat16")  # fmt: skip
    sampling = dict(temperature=0.7, top_p=0.95, max_tokens=16)
    try:
        question = "Take the last letters of the words in \"Ada Lovelace\" and concatenate them."
        (samples,), _ = run_pass(engine, PassRun(METHODS["system1"], 2, sampling, 2, 1, None, None),
                                 [{"question": question, "format": ""}])  # fmt: skip
    finally:
        engine.close()
    assert len(samples) == 2 and all(s.error is None and s.tokens["answer"] > 0 for s in samples)


def test_a_streamed_request_and_a_turns_batched_prompts_on_cuda(cuda_trained):
    """The engine paths that differ per request on a GPU engine: a streamed request gets
    its text so far after each step (vLLM's cumulative outputs), ending in exactly the text
    `step` returns; a turn's prompts tokenized in one call are the ids of one at a time."""
    from s2d_ray.chat import prompt_ids
    from s2d_ray.config import EngineConfig
    from s2d_ray.engine import Engine

    engine = Engine(str(cuda_trained / "model"), EngineConfig(device="cuda", gpu_memory_utilization=0.4,
                    max_model_len=1024), dtype="bfloat16")  # fmt: skip
    try:
        texts = ["Take the last letters of the words in \"Ada Lovelace\".", "Is a coin flipped twice still heads up?"]
        assert engine.encode_many(texts + texts[:1]) == [prompt_ids(engine.tokenizer, t) for t in texts + texts[:1]]
        seen: list[str] = []
        streamed = engine.submit(engine.encode(texts[0]), engine.sampling(temperature=0.0, top_p=1.0, max_tokens=24),
                                 on_text=seen.append)  # fmt: skip
        plain = engine.submit(engine.encode(texts[1]), engine.sampling(temperature=0.0, top_p=1.0, max_tokens=24))
        done = {}
        while engine.busy:
            done.update(engine.step())
    finally:
        engine.close()
    final = done[streamed][0].text
    assert set(done) == {streamed, plain} and len(seen) >= 2  # pieces before it finished
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:])) and final.startswith(seen[-1])


@pytest.mark.skipif(GPUS < 2, reason=f"tensor parallel 2 needs two GPUs; this node has {GPUS}")
def test_tensor_parallel_generation_stage(tmp_path):
    s2d("generate", str(LOCAL_JOB), "--out", str(tmp_path),
        *cuda_settings("engine.tensor_parallel=2", "task.train=8", "filter.samples=2", "train.workers=1"))  # fmt: skip
    ids = pq.read_table(tmp_path / "generate").column("id").to_pylist()
    assert len(ids) == 8 and len(set(ids)) == 8
    assert json.loads((tmp_path / "run.json").read_text())["stages"]["generate"]["inputs"] == 8
