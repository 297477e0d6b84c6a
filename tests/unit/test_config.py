from pathlib import Path

import pytest

from s2d_ray.config import load_config
from s2d_ray.errors import ConfigError

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _load(tmp_path, text, *overrides):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    return load_config(job, overrides)


MINIMAL = "task: {name: last_letter}\n"


def test_shipped_local_job_is_valid():
    cfg = load_config(JOBS / "local" / "last-letter-rar2.yaml")
    assert cfg.task.name == "last_letter" and cfg.method.name == "rar2" and cfg.train.zero_stage == 3


def test_local_and_paper_jobs_cover_the_five_experiments():
    expected = {("last_letter", "rar2", "majority"), ("coin_flip", "rar2", "majority"), ("triviaqa", "s2a", "usc"),
                ("pairwise", "bsm", "swap"), ("gsm8k", "cot", "majority")}  # fmt: skip
    for folder in ("local", "paper"):
        cfgs = [load_config(j) for j in sorted((JOBS / folder).glob("*.yaml"))]
        assert {(c.task.name, c.method.name, c.filter.name) for c in cfgs} == expected, folder
    paper = {load_config(j).task.name: load_config(j) for j in (JOBS / "paper").glob("*.yaml")}
    assert paper["gsm8k"].filter.samples == 10 and paper["triviaqa"].filter.samples == 20
    assert all(c.engine.device == "cuda" and c.train.lr == 5.5e-6 for c in paper.values())


@pytest.mark.parametrize("job", sorted(JOBS.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_is_valid(job):
    cfg = load_config(job)
    assert cfg.name and cfg.out


def test_overrides_are_typed(tmp_path):
    cfg = _load(tmp_path, MINIMAL, "filter.samples=4", "engine.concurrency=[1, 3]", "train.offload_params=false")
    assert cfg.filter.samples == 4 and cfg.engine.concurrency == (1, 3)


@pytest.mark.parametrize(
    "override, message",
    [
        ("filter.samples=0", "filter.samples: Input should be greater than or equal to 1"),
        ("filter.min_agreement=1.5", "filter.min_agreement: Input should be less than or equal to 1"),
        ("engine.concurrency=[3, 1]", "concurrency min (3) > max (1)"),
        ("engine.tensor_parallel=4", "need device: cuda"),
        ("engine.tensor_paralel=4", "engine.tensor_paralel: unknown key"),
        ("train.offload_optimizer=true", "only make sense with use_gpu"),
        ("filter.samples=many", "filter.samples: Input should be a valid integer"),
        ("method.name=rar9", "unknown method 'rar9'"),
        ("method.prompts={nostep: hi}", "has no step 'nostep'"),
        ("task.name=sudoku", "task.name: unknown task 'sudoku'; known: coin_flip, custom, gsm8k"),
        ("task.words_per_example=0", "task.words_per_example: Input should be greater than or equal to 1"),
        ("method.name=bsm", "bsm is for a pairwise judge task"),
        ("filter.name=swap", "filter swap needs a task with swappable inputs"),
        ("filter.confidence=0.9", "filter.confidence only applies with adaptive: true"),
        ("bogus=1", "bogus: unknown key"),
        ("sampling.temperature=0", "greedy) makes all 8 samples identical"),
        ("train.micro_batch_tokens=100", "train.micro_batch_tokens 100 < train.max_seq_len"),
        ("engine.max_restarts=-1", "engine.max_restarts: Input should be greater than or equal to 0"),
        ("engine.stall_timeout_s=1", "engine.stall_timeout_s: Input should be greater than or equal to 5"),
        ("engine.batches_per_engine=0", "engine.batches_per_engine: Input should be greater than or equal to 1"),
        ("engine.max_num_seqs=0", "engine.max_num_seqs: Input should be greater than or equal to 1"),
    ],
)
def test_bad_values_are_one_clear_line(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, MINIMAL, override)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert err.value.exit_code == 2


def test_missing_task_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="task: required key is missing"):
        _load(tmp_path, "name: x\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        _load(tmp_path, "task: [\n")
    with pytest.raises(ConfigError, match="job file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        _load(tmp_path, MINIMAL, "filter.samples")


def test_gpu_settings_are_validated_on_cpu(tmp_path):
    gpu = "task: {name: last_letter}\nengine: {device: cuda, tensor_parallel: 8}\ntrain: {use_gpu: true, backend: nccl, offload_optimizer: true}\n"
    cfg = _load(tmp_path, gpu)
    assert cfg.engine.gpus_per_engine == 8
    with pytest.raises(ConfigError, match="use_gpu: true needs backend: nccl"):
        _load(tmp_path, gpu, "train.backend=gloo")
    with pytest.raises(ConfigError, match="disagree"):
        _load(tmp_path, gpu, "train.use_gpu=false", "train.backend=gloo", "train.offload_optimizer=false")
