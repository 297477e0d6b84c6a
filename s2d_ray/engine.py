"""The only module that imports vLLM: one engine, batched generation, token counts.

vLLM's API moves fast; keeping it behind `Engine.generate` means a version bump
touches this file and nothing else.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

from s2d_ray.chat import chat_prompt
from s2d_ray.config import EngineConfig
from s2d_ray.placement import runs_on_cpu

# Environment a CPU engine needs; set in the generator actor before vLLM is imported.
CPU_ENGINE_ENV = {
    # vLLM otherwise keeps one core for itself: on 2 cores that halves throughput.
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    # One process instead of three (front end, engine core, worker): no core lost to
    # the engine core's busy polling, and the engine dies with the actor that hosts it.
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "TOKENIZERS_PARALLELISM": "false",
}
GPU_ENGINE_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    # Set when the prompt was not generated from (it does not fit the context): the
    # input fails alone instead of failing its whole batch.
    error: str | None = None


class Engine:
    def __init__(self, model_path: str, cfg: EngineConfig, dtype: str = "bfloat16", seed: int = 0):
        on_cpu = runs_on_cpu(cfg.device)
        self.device = cfg.device
        for key, value in (CPU_ENGINE_ENV if on_cpu else GPU_ENGINE_ENV).items():
            os.environ.setdefault(key, value)
        from vllm import LLM

        kwargs = dict(
            model=model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=cfg.max_model_len,
            enforce_eager=on_cpu if cfg.enforce_eager is None else cfg.enforce_eager,
            enable_prefix_caching=True,
            trust_remote_code=False,
        )
        if on_cpu:  # also behind fake GPUs (tests): one CPU process whatever the parallelism
            kwargs.update(kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30), distributed_executor_backend="uni")
        else:
            kwargs.update(
                tensor_parallel_size=cfg.tensor_parallel,
                pipeline_parallel_size=cfg.pipeline_parallel,
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                # Multi-GPU engines inside a Ray actor schedule their workers through Ray, in
                # the placement group the actor was started in (vLLM records it in its
                # ParallelConfig, so its engine-core process finds it too).
                distributed_executor_backend="ray" if cfg.gpus_per_engine > 1 else "uni",
            )
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def generate(
        self,
        user_texts: list[str],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_tokens: int,
    ) -> list[list[Completion]]:
        """Chat-format each text, sample `n` completions for each, keep input order.

        Sampling is seeded once per engine (at construction): per-request seeds
        crash the CPU backend ("CPU Generator does not use offset").
        """
        from vllm import SamplingParams

        if not user_texts:
            return []
        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p if temperature > 0 else 1.0,
            max_tokens=max_tokens,
        )
        # Tokenized once, here, as vLLM would (special tokens such as BOS included), and handed
        # over as token ids. vLLM rejects a whole generate() call when one prompt does not fit
        # the context; such a prompt is left out and answered with an error of its own.
        ids = [self.tokenizer.encode(chat_prompt(self.tokenizer, t), add_special_tokens=True) for t in user_texts]
        fits = [i for i, prompt in enumerate(ids) if len(prompt) < self.max_model_len]
        requests = [{"prompt_token_ids": ids[i]} for i in fits]
        outputs = dict(zip(fits, self.llm.generate(requests, params, use_tqdm=False))) if fits else {}
        out = []
        for i, prompt in enumerate(ids):
            if i in outputs:
                out.append([Completion(o.text, len(o.token_ids)) for o in outputs[i].outputs])
            else:
                error = f"prompt of {len(prompt)} tokens does not fit engine.max_model_len {self.max_model_len}"
                out.append([Completion("", 0, error)] * n)
        return out

    def prompt_tokens(self, user_text: str) -> int:
        """Length of a chat-formatted prompt in tokens (to check it fits the context)."""
        return len(self.tokenizer.encode(chat_prompt(self.tokenizer, user_text), add_special_tokens=False))

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        gc.collect()
        if not runs_on_cpu(self.device):
            import torch

            torch.cuda.empty_cache()  # an in-process engine's cached blocks
