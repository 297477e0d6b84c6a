"""The only module that imports vLLM: one engine, batched generation, token counts.

vLLM's API moves fast; keeping it behind `Engine.generate` means a version bump
touches this file and nothing else.
"""

from __future__ import annotations

import gc
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from s2d_ray.chat import prompt_ids_many
from s2d_ray.config import EngineConfig
from s2d_ray.hooks import record_boundary
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


class EngineDead(RuntimeError):
    """The engine can serve no more requests: vLLM's engine-dead error, a CUDA error, or
    any error inside an engine step (it cannot be pinned on one input). Never retried
    against the same engine: its actor exits and Ray starts another."""


# Test hook (fault injection on the real engine): "stall" or "die", fired at the third
# engine step; with ":<path>", fired once per machine (the file records that it fired).
FAULT_ENV = "S2D_TEST_ENGINE_FAULT"
ENCODED = 4096  # prompts whose token ids an engine remembers (Engine.encode)


def _reason(err: BaseException) -> str:
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(err, EngineDeadError):  # its own text points at a stack trace; the cause says more
        cause = err.__cause__ or err.__context__
        return "vLLM's engine core died" + (f" ({type(cause).__name__}: {cause})" if cause else "")
    return f"{type(err).__name__}: {err}"


def _completion(c) -> Completion:
    # The engine ends a request it could not serve with finish reason "error" (and "abort"
    # when aborted): a failed sample with that reason, not an empty answer.
    if c.finish_reason in ("error", "abort"):
        return Completion(c.text, len(c.token_ids), f"engine ended the request ({c.finish_reason})")
    return Completion(c.text, len(c.token_ids))


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    # Set when the prompt was not generated from (it does not fit the context): the
    # input fails alone instead of failing its whole batch.
    error: str | None = None


def engine_kwargs(model_path: str, cfg: EngineConfig, dtype: str, seed: int) -> dict:
    """`vllm.LLM`'s arguments for an engine of `cfg` (the benchmarks' plain engines use them too)."""
    on_cpu = runs_on_cpu(cfg.device)
    kwargs = dict(
        model=model_path,
        dtype=dtype,
        seed=seed,
        max_model_len=cfg.max_model_len,
        enforce_eager=on_cpu if cfg.enforce_eager is None else cfg.enforce_eager,
        enable_prefix_caching=True,
        trust_remote_code=False,
    )
    if cfg.max_num_seqs is not None:
        kwargs["max_num_seqs"] = cfg.max_num_seqs
    if cfg.max_num_batched_tokens is not None:
        kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
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
    return kwargs


class Engine:
    def __init__(self, model_path: str, cfg: EngineConfig, dtype: str = "bfloat16", seed: int = 0,
                 chat_template: str | None = None):  # fmt: skip
        on_cpu = runs_on_cpu(cfg.device)
        self.device = cfg.device
        self.chat_template = chat_template
        for key, value in (CPU_ENGINE_ENV if on_cpu else GPU_ENGINE_ENV).items():
            os.environ.setdefault(key, value)
        from vllm import LLM

        kwargs = engine_kwargs(model_path, cfg, dtype, seed)
        self.llm = LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        sched = self.llm.llm_engine.vllm_config.scheduler_config
        # What vLLM really used (its defaults depend on the device): logged by the caller.
        self.limits = {"max_num_seqs": sched.max_num_seqs, "max_num_batched_tokens": sched.max_num_batched_tokens}
        self._ids = itertools.count()
        self._encoded: dict[str, list[int]] = {}
        self._live: set[str] = set()
        self._streams: dict[str, Callable[[str], None]] = {}  # request id -> its text so far, each step
        # Watched from outside (stall detection): when the engine last finished a step, and
        # whether it has requests in flight.
        self.last_progress = time.monotonic()
        self._steps = 0
        self._fault = os.environ.get(FAULT_ENV)

    # Request level: `submit` queues one prompt, `step` runs one engine step and returns the
    # requests it finished. The caller may submit more between steps (dataflow).
    @property
    def busy(self) -> bool:
        return bool(self._live)

    def encode(self, user_text: str) -> list[int]:
        """Chat-formatted and tokenized once, here, exactly as training tokenizes it."""
        return self.encode_many([user_text])[0]

    def encode_many(self, user_texts: list[str]) -> list[list[int]]:
        """`encode` of every text of an engine turn. The last ENCODED texts are remembered
        (a method's first step asks the same prompt once per sample, N times; encoding was
        ~7% of the engine thread's time); the others are tokenized in one tokenizer call
        (one call per prompt was 16% of an evaluation's engine thread, each prompt new)."""
        found = {t: self._encoded[t] for t in user_texts if t in self._encoded}
        missing = [t for t in dict.fromkeys(user_texts) if t not in found]
        for text, ids in zip(missing, prompt_ids_many(self.tokenizer, missing, self.chat_template)):
            found[text] = ids
            if len(self._encoded) >= ENCODED:
                del self._encoded[next(iter(self._encoded))]  # the oldest
            self._encoded[text] = ids
        return [list(found[t]) for t in user_texts]  # each caller its own copy

    @staticmethod
    def sampling(*, temperature: float, top_p: float, max_tokens: int, n: int = 1):
        from vllm import SamplingParams

        return SamplingParams(n=n, temperature=temperature, top_p=top_p if temperature > 0 else 1.0, max_tokens=max_tokens)

    def submit(self, prompt_ids: list[int], params, on_text: Callable[[str], None] | None = None) -> str:
        """Queue one prompt; returns its request id. A prompt the engine rejects (vLLM's
        ValueError: too long, bad parameters) raises ValueError and queues nothing.
        `on_text` (a streamed answer): called after each step with the text so far of the
        request's first completion, until it finishes (then `step` returns it as usual)."""
        from vllm.sampling_params import RequestOutputKind

        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit engine.max_model_len {self.max_model_len}")
        # Only a streamed request has vLLM build its output every step.
        params.output_kind = RequestOutputKind.FINAL_ONLY if on_text is None else RequestOutputKind.CUMULATIVE
        rid = f"s2d-{next(self._ids)}"
        if not self._live:
            self.last_progress = time.monotonic()  # idle time is not a stall
        try:
            self.llm.llm_engine.add_request(rid, {"prompt_token_ids": prompt_ids}, params)
        except ValueError as err:
            try:  # vLLM may have registered it before refusing it: never leave half a request
                self.llm.llm_engine.abort_request([rid])
            except Exception:  # noqa: BLE001 (it was not registered)
                pass
            raise ValueError(f"engine rejected the prompt: {err}") from None
        except Exception as err:  # noqa: BLE001 (classified: the engine itself failed)
            raise EngineDead(_reason(err)) from err
        self._live.add(rid)
        if on_text is not None:
            self._streams[rid] = on_text
        record_boundary("engine", {"ids": prompt_ids})
        return rid

    def step(self) -> list[tuple[str, list[Completion]]]:
        """One engine step; the requests it finished, each with its completions."""
        try:
            self._inject_fault()
            outputs = self.llm.llm_engine.step()
        except Exception as err:  # noqa: BLE001 (any error inside a step is the engine's)
            raise EngineDead(_reason(err)) from err
        self.last_progress = time.monotonic()
        done = []
        for o in outputs:
            if o.request_id not in self._live:
                continue
            if o.finished:
                self._live.discard(o.request_id)
                self._streams.pop(o.request_id, None)
                done.append((o.request_id, [_completion(c) for c in o.outputs]))
            elif o.request_id in self._streams and o.outputs:
                try:
                    self._streams[o.request_id](o.outputs[0].text)
                except Exception:  # noqa: BLE001 (its listener is gone: the request still finishes)
                    del self._streams[o.request_id]
        return done

    def _inject_fault(self) -> None:
        self._steps += 1
        if not self._fault or self._steps != 3:
            return
        kind, _, marker = self._fault.partition(":")
        if marker:
            try:
                with open(marker, "x"):
                    pass
            except FileExistsError:
                return
        if kind == "stall":
            while True:
                time.sleep(3600)
        from vllm.v1.engine.exceptions import EngineDeadError

        raise EngineDeadError()

    def prompt_tokens(self, user_text: str) -> int:
        """Length of a chat-formatted prompt in tokens, counted as `submit` counts it."""
        return len(self.encode(user_text))

    def kill(self) -> None:
        """Before the hosting process leaves without cleanup (os._exit): kill every process
        it started. On a GPU, vLLM's engine core is a child process that owns the GPU (and
        the Ray workers of a tensor-parallel engine, which die with it); nothing in vLLM
        0.32 makes it notice its parent's exit, so it would keep the GPU for ever."""
        import psutil

        children = psutil.Process().children(recursive=True)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(children, timeout=10)

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


def generation_architectures() -> set[str] | None:
    """The model architectures this vLLM generates with, read from its model registry's
    source without importing vLLM (seconds saved in every preflight); None if unreadable."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec("vllm")  # the top-level package only: nothing is imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(next(iter(spec.submodule_search_locations)), "model_executor", "models", "registry.py")
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except (OSError, SyntaxError):
        return None
    tables = {"_TEXT_GENERATION_MODELS", "_MULTIMODAL_MODELS", "_TRANSFORMERS_SUPPORTED_MODELS"}
    found: set[str] = set()
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if isinstance(target, ast.Name) and target.id in tables and isinstance(node.value, ast.Dict):
            found.update(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return found or None
