"""The CPU suite's learning check on CUDA, through the real path: `s2d train` (Ray Train
workers on the GPUs, NCCL, ZeRO-3, bf16, checkpointing), the streamed export, then the
distilled model answers its training prompts: with `s2d eval` on a CUDA vLLM where one is
installed, else with transformers' greedy decoding on the GPU."""

import json


from tests.conftest import s2d
from tests.gpu.conftest import LOCAL_JOB, PAIRS, cuda_vllm, learning_settings, needs_cuda, write_learning_set

pytestmark = needs_cuda


def test_training_on_cuda_teaches_the_model_its_targets(cuda_trained):
    if cuda_vllm():
        s2d("eval", str(LOCAL_JOB), "--out", str(cuda_trained), *learning_settings())
        ev = json.loads((cuda_trained / "eval.json").read_text())
        assert ev["distilled"]["n"] == PAIRS
        assert ev["system1"]["accuracy"] < 0.10, ev["system1"]
        assert ev["distilled"]["accuracy"] >= 0.90, ev["distilled"]
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from s2d_ray.chat import prompt_ids
    from s2d_ray.config import load_config

    cfg = load_config(LOCAL_JOB, ["task.words_per_example=2", f"task.train={PAIRS}"])
    model_dir = cuda_trained / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    right = 0
    for example in cfg.task.examples("train"):
        ids = torch.tensor([prompt_ids(tok, example.question)], device="cuda")  # as the engines get them
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
        answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        right += cfg.task.score(cfg.task.extract(answer), example.answer)
    assert right >= 0.9 * PAIRS, f"{right} of {PAIRS} training targets reproduced"


def test_optimizer_offload_trains_through_ray_train(tmp_path):
    """DeepSpeedCPUAdam (prebuilt by make test-gpu / clusters/Dockerfile, else JIT-built)
    inside Ray Train workers: the run finishes and exports a model."""
    write_learning_set(tmp_path)
    s2d("train", str(LOCAL_JOB), "--out", str(tmp_path), *learning_settings("train.offload_optimizer=true",
        "train.steps=2", "cluster.host_memory_gib=64"))  # fmt: skip
    stage = json.loads((tmp_path / "run.json").read_text())["stages"]["train"]
    assert stage["steps"] == 2 and stage["final_loss"] > 0
    assert list((tmp_path / "model").glob("*.safetensors"))
