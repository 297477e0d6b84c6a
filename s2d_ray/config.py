"""Typed job configuration: YAML file + ``--set key.sub=value`` overrides.

Everything a run does is decided here, validated before anything starts. GPU-only
knobs (tensor parallel, offload, GPUs per worker) are parsed and checked on a CPU
laptop too, so that a typo fails there and not on the cluster.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from s2d_ray.errors import ConfigError
from s2d_ray.methods import METHODS, Program, check_prompt_overrides
from s2d_ray.tasks import TASKS, TaskConfig


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Strict):
    # An embedded model name (see `s2d models`) or a local Hugging Face folder.
    name: str = "smollm2"
    path: str | None = None
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # Parameter count, for memory and cost estimates before the weights are reachable
    # (a laptop validating a cluster job). None: read config.json at `path` if it is there.
    params_billion: float | None = Field(None, gt=0.0)
    # How a task prompt becomes the model's prompt. None: the model folder's own chat
    # template (a folder without one is refused); "none": the raw prompt, on purpose; else
    # a Jinja chat template (it is also saved with the distilled model).
    chat_template: str | None = None

    @field_validator("chat_template")
    @classmethod
    def _template(cls, value):
        if value is None or value == "none":
            return value
        if "{{" not in value and "{%" not in value:
            raise ValueError("must be a Jinja chat template (with {{ ... }} or {% ... %}), or none for raw prompts")
        try:
            import jinja2

            jinja2.Environment().parse(value)
        except jinja2.TemplateSyntaxError as err:
            raise ValueError(f"the chat template does not parse: {err.message} (line {err.lineno})") from None
        return value


class MethodConfig(Strict):
    name: str = "rar2"
    # Per-step prompt overrides: {step name: template}.
    prompts: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self):
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; known: {', '.join(sorted(METHODS))}")
        check_prompt_overrides(self.name, self.prompts)
        return self


class FilterConfig(Strict):
    """Which inputs enter the distillation set, and with which target (SPEC section 3).

    majority: strict majority of N extracted answers (and `min_agreement` of N).
    usc: the model picks the most consistent of its N responses (universal self-consistency).
    swap: the method runs on the input and on its perturbation (A/B swapped); verdicts must agree.
    none: keep the first sample's answer (ablation).
    """

    name: Literal["majority", "usc", "swap", "none"] = "majority"
    samples: int = Field(8, ge=1, le=1024)
    # Fraction of the N samples the winning answer must reach (on top of a strict majority).
    min_agreement: float = Field(0.5, ge=0.0, le=1.0)
    # USC: responses shown when all N do not fit the context (then: a seeded random pick).
    usc_fallback: int = Field(10, ge=2)
    usc_max_tokens: int = Field(24, ge=4)
    # Adaptive voting (majority only): sample in rounds, stop once the vote is decided.
    adaptive: bool = False
    round_size: int = Field(2, ge=1)
    # Also stop when P(leader holds a majority) reaches this (None: only when the N-vote is certain).
    confidence: float | None = Field(None, gt=0.5, lt=1.0)
    # Also stop once the last `window` samples agree (early-stopping self-consistency).
    window: int | None = Field(None, ge=2)

    @model_validator(mode="after")
    def _check(self):
        if self.window is not None and not self.adaptive:
            raise ValueError("filter.window only applies with adaptive: true")
        if self.window is not None and self.window > self.samples:
            raise ValueError(f"filter.window {self.window} > filter.samples {self.samples}")
        if self.adaptive and self.name != "majority":
            raise ValueError(f"adaptive voting needs filter.name: majority, not {self.name!r}")
        if self.confidence is not None and not self.adaptive:
            raise ValueError("filter.confidence only applies with adaptive: true")
        if self.name == "usc" and self.samples < 2:
            raise ValueError("usc picks among responses: filter.samples must be >= 2")
        return self


class SamplingConfig(Strict):
    temperature: float = Field(0.8, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    max_tokens: int = Field(128, ge=1)
    seed: int = 0


class EngineConfig(Strict):
    """One vLLM engine per generator actor."""

    device: Literal["cpu", "cuda"] = "cpu"
    tensor_parallel: int = Field(1, ge=1)
    pipeline_parallel: int = Field(1, ge=1)
    # GPU: fraction of GPU memory for weights + KV cache. CPU: ignored (see kv_cache_gib).
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    # CPU: host memory reserved for the KV cache, in GiB.
    kv_cache_gib: float = Field(2.0, gt=0.0)
    max_model_len: int = Field(2048, ge=64)
    # Skip torch.compile and CUDA graphs. None: on for CPU (start-up ~20 s instead of ~100 s),
    # off on GPUs (graphs make decoding, above all tensor-parallel decoding, much faster).
    enforce_eager: bool | None = None
    # Autoscaling pool of generator actors: (min, max) engines.
    concurrency: tuple[int, int] = (1, 1)
    # Inputs per map_batches call (at most: smaller when that gives every engine of the
    # pool at least two batches); one engine runs the whole program over the batch.
    batch_size: int = Field(16, ge=1)
    # Batches an engine works on at once: their requests share its queue, so one batch's
    # tail of long sequences never leaves the engine idle.
    batches_per_engine: int = Field(2, ge=1, le=16)
    cpus_per_engine: float = Field(1.0, gt=0.0)
    # vLLM's scheduler limits (None: vLLM's defaults for the device); the values the engine
    # really used are logged when it starts.
    max_num_seqs: int | None = Field(None, ge=1)
    max_num_batched_tokens: int | None = Field(None, ge=16)
    # An engine that makes no progress for this long while it has work is taken for dead:
    # its actor exits, Ray starts another and the batch is redone. None: never.
    stall_timeout_s: float | None = Field(600.0, ge=5.0)
    # Engine deaths (vLLM's engine-dead error, CUDA errors, stalls) tolerated in one stage,
    # all engines together; one more fails the stage with the last reason.
    max_restarts: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _check(self):
        lo, hi = self.concurrency
        if lo < 1:
            raise ValueError(f"concurrency min must be >= 1, got {lo}")
        if lo > hi:
            raise ValueError(f"concurrency min ({lo}) > max ({hi})")
        if self.device == "cpu" and self.tensor_parallel * self.pipeline_parallel > 1:
            raise ValueError("tensor_parallel/pipeline_parallel > 1 need device: cuda")
        return self

    @property
    def gpus_per_engine(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel if self.device == "cuda" else 0


class TrainConfig(Strict):
    workers: int = Field(2, ge=1)
    use_gpu: bool = False
    gpus_per_worker: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0.0)
    backend: Literal["gloo", "nccl"] = "gloo"
    zero_stage: Literal[3] = 3
    offload_optimizer: bool = False
    offload_params: bool = False
    bf16: bool = True
    gradient_checkpointing: bool = True
    lr: float = Field(5.5e-6, gt=0.0, lt=1.0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    epochs: float = Field(1.0, gt=0.0)
    # If set, overrides epochs: exact number of optimizer steps.
    steps: int | None = Field(None, ge=1)
    micro_batch_size: int = Field(4, ge=1)
    # Micro-batches are cut from windows of `bucket_window` x micro_batch_size rows sorted
    # by length (less padding; the order of micro-batches is then shuffled, seeded). 1: off.
    bucket_window: int = Field(16, ge=1, le=1024)
    # Cap on a micro-batch's padded tokens (rows x its longest row): fewer rows where rows
    # are long (GPU memory). None: always micro_batch_size rows. Not with streaming.
    micro_batch_tokens: int | None = Field(None, ge=16)
    grad_accum: int = Field(1, ge=1)
    max_seq_len: int = Field(512, ge=16)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    seed: int = 0
    # How Ray places the worker group's bundles across nodes (Ray placement-group strategies).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Fault tolerance: a ZeRO-3 checkpoint (every rank writes its own shard) every this many
    # steps (None: about ten a run; 0: none), the newest `keep_checkpoints` kept, and the
    # worker group restarted from the latest one up to `max_failures` times.
    checkpoint_every: int | None = Field(None, ge=0)
    # Where a rank writes its checkpoint shard: "none", straight into the run directory's
    # storage (shared on a cluster); "local", first on the node's disk ($TMPDIR: it needs
    # room for every rank's shard of that node), then copied by Ray Train.
    checkpoint_staging: Literal["none", "local"] = "none"
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(3, ge=0)
    # Timeout of every collective of the trainer group (NCCL/gloo), the data-parallel
    # clone DeepSpeed makes included; a rank that waits longer fails the group.
    collective_timeout_s: float = Field(1800.0, ge=60.0)
    # The exported checkpoint is written in safetensors shards of at most this size,
    # each as soon as it is full: rank 0 never holds more than one shard of the model.
    export_shard_gib: float = Field(4.0, gt=0.0, le=64.0)
    # Train while generating: the trainer consumes the distillation stream as it is produced,
    # in one pass, on resources of its own (needs `steps`, the length of the LR schedule).
    streaming: bool = False

    @model_validator(mode="after")
    def _check(self):
        if self.use_gpu and self.gpus_per_worker != 1:
            raise ValueError("gpus_per_worker must be 1: a DeepSpeed rank drives one GPU (use more workers)")
        if self.streaming and self.steps is None:
            raise ValueError("streaming: true needs train.steps (the stream's length is not known in advance)")
        if self.use_gpu and self.backend != "nccl":
            raise ValueError("use_gpu: true needs backend: nccl")
        if not self.use_gpu and self.backend != "gloo":
            raise ValueError("training on CPU needs backend: gloo")
        if (self.offload_optimizer or self.offload_params) and not self.use_gpu:
            raise ValueError("offload_optimizer/offload_params only make sense with use_gpu: true")
        return self


def _distinct_labels(labels: list[str], what: str) -> None:
    for label in labels:
        if labels.count(label) > 1:
            raise ValueError(f"two {what} labelled {label!r}: give each a distinct label")


class NoHarmConfig(Strict):
    """A task the model was not distilled on, scored on the base and the distilled model
    (System 1, and System 2 with `method`) to show what distillation cost elsewhere."""

    task: TaskConfig
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$")  # default: the task's name
    method: str | None = None  # a System 2 method to score too (rar2, s2a, ...); None: System 1 only

    @model_validator(mode="after")
    def _known(self):
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(sorted(METHODS))}")
        if self.label is None:
            object.__setattr__(self, "label", self.task.name)
        return self


class EvalConfig(Strict):
    split: Literal["train", "validation", "test"] = "test"
    max_tokens: int = Field(128, ge=1)
    system2: bool = True
    # Tasks not distilled on: did the distilled model get worse at them (a paired test)?
    no_harm: list[NoHarmConfig] = Field(default_factory=list)

    @field_validator("no_harm")
    @classmethod
    def _distinct(cls, value: list[NoHarmConfig]):
        _distinct_labels([v.label for v in value], "no-harm tasks")
        return value


class CostConfig(Strict):
    """Prices and the throughput assumptions of `s2d estimate` (defaults: see s2d_ray/estimate.py)."""

    # Price of one device-hour (a GPU, or a CPU node on a laptop run), in your currency.
    device_hour_price: float = Field(0.0, ge=0.0)
    currency: str = "USD"
    # Generated tokens per second of one engine, and trained tokens per second of one worker.
    generation_tokens_per_second: float | None = Field(None, gt=0.0)
    training_tokens_per_second: float | None = Field(None, gt=0.0)
    # Share of max_tokens an output really uses, and share of inputs the filter keeps.
    output_fraction: float = Field(0.5, gt=0.0, le=1.0)
    kept_fraction: float = Field(0.5, gt=0.0, le=1.0)


class BudgetConfig(Strict):
    """Stop generation cleanly once this much is spent; what was produced is kept."""

    tokens: int | None = Field(None, ge=1)
    money: float | None = Field(None, gt=0.0)


class ClusterConfig(Strict):
    """What the GPU cluster offers, for checks before anything is allocated."""

    gpu_memory_gib: float = Field(80.0, gt=0.0)
    # GPUs per node and the most GPU nodes the autoscaler may start; None: read the live cluster.
    gpus_per_node: int | None = Field(None, ge=1)
    max_nodes: int | None = Field(None, ge=1)
    # Host memory per GPU node (CPU offload keeps optimizer states / parameters there).
    host_memory_gib: float | None = Field(None, gt=0.0)
    # Where `s2d submit` puts run directories whose --out is relative (storage every node sees).
    runs_dir: str | None = None
    # Write bandwidth of the storage the run directory is on, all ranks together (GiB/s):
    # what `s2d estimate` prices checkpoints at. 1.0 is a modest shared filesystem (an FSx
    # for Lustre of ~5 TiB at 200 MB/s per TiB, or EFS in elastic mode); measure yours.
    storage_gib_per_s: float = Field(1.0, gt=0.0)

    @field_validator("runs_dir")
    @classmethod
    def _absolute(cls, value):
        if value is not None and not os.path.isabs(value):
            raise ValueError(f"must be an absolute path on shared storage, not {value!r}")
        return value


class TrackingConfig(Strict):
    """Experiment tracking with MLflow (the optional extra `s2d-ray[tracking]`): the job's
    settings, each stage's figures, the training loss per step, the evaluation and the
    report, in one MLflow run per run directory (a resumed command adds to the same run)."""

    mlflow: bool = False
    # A local folder (MLflow's file store: works offline) or a server, http(s)://HOST:PORT;
    # also databricks, or sqlite:///FILE with the full `mlflow` package. None:
    # $MLFLOW_TRACKING_URI, else the folder mlruns/ beside the run directory.
    uri: str | None = None
    experiment: str = Field("s2d-ray", min_length=1)

    @field_validator("uri")
    @classmethod
    def _scheme(cls, value):
        if value is None or "://" not in value and not value.startswith(("file:", "databricks")):
            return value  # a local folder
        scheme = value.split(":", 1)[0]
        if scheme not in ("file", "http", "https", "databricks", "sqlite", "postgresql", "mysql"):
            raise ValueError(f"{value!r}: not an MLflow tracking URI (a folder, http(s)://, file:, databricks, sqlite:///...)")
        return value



class ServeConfig(Strict):
    """`s2d serve`: each model's engine replicas, and the limits every request meets."""

    # Engine replicas per model (base, distilled): Ray Serve scales between the two on
    # the requests each replica has ongoing.
    min_replicas: int = Field(1, ge=1)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: int = Field(32, ge=1)
    # A replica's requests at once; past it they wait in Serve's queue.
    max_ongoing_requests: int = Field(256, ge=1)
    # Requests the server holds at once; past it: 503 with Retry-After (bounded memory).
    max_in_flight: int = Field(512, ge=1)
    # The largest `max_tokens` a request may ask; None: the engine's context.
    max_tokens: int | None = Field(None, ge=1)
    max_body_kib: int = Field(1024, ge=1)
    # Seconds a stopping server gives the requests in flight to finish.
    drain_s: float = Field(120.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"serve.min_replicas {self.min_replicas} > serve.max_replicas {self.max_replicas}")
        return self


class TaskEntry(Strict):
    """One task of a pipeline job (`tasks:`): its own method, filter and samples; all are
    generated on the same engines, distilled into one model, evaluated each on its own."""

    task: TaskConfig
    method: MethodConfig = MethodConfig()
    filter: FilterConfig = FilterConfig()
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$")  # default: the task's name
    # At most this many kept rows of this task in the distillation set (a seeded subset).
    cap: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _label(self):
        if self.label is None:
            object.__setattr__(self, "label", self.task.name)
        return self


class RayConfig(Strict):
    # None: start a local Ray; "auto": join the cluster this runs on; or ray://... / host:port.
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)


class JobConfig(Strict):
    name: str = "s2d"
    out: str = "runs/s2d"
    model: ModelConfig = ModelConfig()
    task: TaskConfig
    # A pipeline: several tasks distilled into one model (`task`, `method` and `filter`
    # then mirror the first one, for what looks at one task: the estimate, the checks).
    tasks: list[TaskEntry] = Field(default_factory=list)
    method: MethodConfig = MethodConfig()
    filter: FilterConfig = FilterConfig()
    sampling: SamplingConfig = SamplingConfig()
    engine: EngineConfig = EngineConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    cost: CostConfig = CostConfig()
    budget: BudgetConfig = BudgetConfig()
    cluster: ClusterConfig = ClusterConfig()
    ray: RayConfig = RayConfig()
    tracking: TrackingConfig = TrackingConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="before")
    @classmethod
    def _first_task(cls, data):
        """With `tasks:`, the top-level task, method and filter are the first task's."""
        if not isinstance(data, dict) or not data.get("tasks") or not isinstance(data["tasks"], list):
            return data
        first = data["tasks"][0]
        if not isinstance(first, dict):
            return data
        data = dict(data)
        for key in ("task", "method", "filter"):
            if key in data and data[key] != first.get(key):
                raise ValueError(f"with tasks:, give {key} inside each task, not at the top of the job")
            if key in first or key != "task":
                data[key] = first.get(key, {})
        return data

    def eval_name(self, label: str, which: str) -> str:
        """The eval/ folder of a task's evaluation on one model ("base", "distilled"):
        eval/base/ for a single-task job, eval/LABEL-base/ for a pipeline's task."""
        return f"{label}-{which}" if self.tasks else which

    def entries(self) -> list[tuple[str, "JobConfig"]]:
        """(label, a job of this task alone) for each task: one entry for a single-task job."""
        if not self.tasks:
            return [(self.task.name, self)]
        return [(e.label, self.model_copy(update={"task": e.task, "method": e.method, "filter": e.filter, "tasks": []}))
                for e in self.tasks]  # fmt: skip

    @model_validator(mode="after")
    def _cross(self):
        _distinct_labels([e.label for e in self.tasks], "tasks")
        for label, sub in self.entries()[1:]:
            try:
                sub._one_task()
            except ValueError as err:
                raise ValueError(f"tasks {label}: {err}") from None
        self._one_task()
        if self.train.use_gpu != (self.engine.device == "cuda"):
            raise ValueError("engine.device and train.use_gpu disagree (cuda needs use_gpu: true)")
        if self.train.streaming and self.train.micro_batch_tokens is not None:
            raise ValueError("train.micro_batch_tokens varies micro-batches per rank; a stream needs equal ones "
                             "(every rank must run out at the same step): leave it unset with train.streaming")  # fmt: skip
        if self.train.micro_batch_tokens is not None and self.train.micro_batch_tokens < self.train.max_seq_len:
            raise ValueError(f"train.micro_batch_tokens {self.train.micro_batch_tokens} < train.max_seq_len "
                             f"{self.train.max_seq_len}: a row of the longest length would not fit alone")  # fmt: skip
        if self.tasks and self.budget.tokens:
            raise ValueError("budget.tokens counts one task's tokens; a job with tasks: takes budget.money "
                             "(the generation stage's device time, every task included)")  # fmt: skip
        if self.train.streaming and self.tasks:
            raise ValueError("train.streaming trains on one task's stream; a job with tasks: runs its stages in turn")
        if self.train.streaming and (self.budget.tokens or self.budget.money):
            raise ValueError("budget stops generation between parts; it is not available with train.streaming")
        for other in self.eval.no_harm:
            for name in {"system1", other.method or "system1"}:
                try:
                    self.program(name, other.task)
                except ValueError as err:
                    raise ValueError(f"eval.no_harm {other.label}: {err}") from None
        if self.engine.device == "cuda":
            from s2d_ray.estimate import check_fits

            check_fits(self)  # tensor parallel vs node size, memory of engines and trainers
        return self

    def _one_task(self) -> None:
        """What must hold of each task with its method and filter."""
        if self.sampling.temperature == 0 and self.filter.samples > 1:
            raise ValueError(
                f"sampling.temperature 0 (greedy) makes all {self.filter.samples} samples identical; "
                "use a temperature > 0 or filter.samples: 1"
            )
        if self.filter.name == "swap" and not self.task.has_perturbation:
            raise ValueError(f"filter swap needs a task with swappable inputs (pairwise); {self.task.name!r} has none")
        for name in {"system1", self.method.name}:
            self.program(name)  # every placeholder of every step resolves for this task

    def with_serve(self, settings: dict) -> "JobConfig":
        """This job with its serve: section overridden (`s2d serve`'s flags), validated."""
        if not settings:
            return self
        try:
            serve = ServeConfig.model_validate({**self.serve.model_dump(), **settings})
        except ValidationError as err:
            raise ConfigError(f"serve: {err.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        return self.model_copy(update={"serve": serve})

    def program(self, name: str, task=None) -> Program:
        """A method's program with the task's prompt overrides, then the job's (for the
        job's own task; `task`: another, a no-harm task, with its own overrides only)."""
        own = task is None
        task = self.task if own else task
        program = METHODS[name].with_prompts(task.method_prompts.get(name, {}))
        if own and name == self.method.name:
            program = program.with_prompts(self.method.prompts)
        program.check_templates(task.template_fields)
        return program


def apply_override(data: dict, assignment: str) -> None:
    """Apply one ``key.sub=value`` override in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected key.sub=value")
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    tags = {t.model_fields["name"].default for t in TASKS}  # task.<tag>.field -> task.field
    loc = ".".join(
        str(p) for i, p in enumerate(first["loc"])
        if not str(p).startswith("function-after") and not (i == 1 and first["loc"][0] == "task" and p in tags)
    )  # fmt: skip
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "union_tag_invalid":
        ctx = first.get("ctx", {})
        loc, msg = f"{loc}.name", f"unknown task {ctx.get('tag')!r}; known: {', '.join(sorted(tags))}"
    elif first["type"] == "union_tag_not_found":
        loc, msg = f"{loc}.name", f"required key is missing (one of {', '.join(sorted(tags))})"
    elif first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{loc or 'job'}: {msg}{extra}"


def parse_config(data: dict, source: str = "job") -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe(err)}") from None


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a job file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text job file (byte {err.start} is not UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the job file ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a job file is a mapping of sections")
    for assignment in overrides:
        apply_override(data, assignment)
    return parse_config(data, str(path))


def config_dict(cfg: JobConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
