"""The target model's conventions on a laptop, and the model folder checked when a job loads."""

import json
import re
import shutil
import time

import pytest

from s2d_ray.chat import leading_bos, prompt_ids
from s2d_ray.config import load_config
from s2d_ray.errors import ModelError
from s2d_ray.preflight import family_context, model_facts
from tests.conftest import ROOT, s2d, s2d_here
from tests.fixtures.models import make_model

LOCAL = ROOT / "jobs" / "local" / "last-letter-rar2.yaml"
PAPER = sorted((ROOT / "jobs" / "paper").glob("*.yaml"))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: make_model(kind, root / kind) for kind in ("llama2-chat", "no-template", "plain")}


def _tok(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def test_the_llama2_fixture_has_llama2s_conventions(fixtures):
    tok = _tok(fixtures["llama2-chat"])
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>[INST]")  # the template writes bos_token
    assert tok.encode("hi")[0] == tok.bos_token_id  # and the tokenizer adds one
    assert leading_bos(tok.encode(text), tok.bos_token_id) == 2  # what tokenizing chat text with specials gave
    assert json.loads((fixtures["llama2-chat"] / "config.json").read_text())["max_position_embeddings"] == 4096


@pytest.mark.parametrize("kind, template", [("llama2-chat", None), ("no-template", "none"), ("plain", None)])
def test_every_prompt_starts_with_exactly_one_bos(fixtures, kind, template):
    from s2d_ray.chat import prompt_ids_many

    tok = _tok(fixtures[kind])
    ids = prompt_ids(tok, "Take the last letters of: apple pie", template)
    assert leading_bos(ids, tok.bos_token_id) == 1, ids[:4]  # plain: the template's own <|im_start|>
    # An engine turn encodes its prompts in one call: exactly the ids of one at a time.
    texts = ["Take the last letters of: apple pie", "hi", "A coin is heads up. Is it still heads up?", "hi"]
    assert prompt_ids_many(tok, texts, template) == [prompt_ids(tok, t, template) for t in texts]


def test_training_masks_exactly_the_ids_the_engines_are_handed(fixtures):
    from s2d_ray.training import IGNORE, encode

    tok = _tok(fixtures["llama2-chat"])
    ids, labels = encode(tok, "Take the last letters of: apple pie", "Answer: ee")
    prompt = prompt_ids(tok, "Take the last letters of: apple pie")
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert labels[len(prompt):] == ids[len(prompt):] and ids[-1] == tok.eos_token_id
    assert tok.bos_token_id not in ids[len(prompt):]  # the answer gets no BOS of its own


def test_a_job_template_is_used_and_none_means_raw(fixtures):
    tok = _tok(fixtures["no-template"])
    with pytest.raises(ValueError, match="no chat template"):
        prompt_ids(tok, "hi")
    custom = "{{ bos_token }}{% for m in messages %}Q: {{ m['content'] }}\nA:{% endfor %}"
    assert tok.decode(prompt_ids(tok, "hi", custom)) == "<|im_start|>Q: hi\nA:"
    assert tok.decode(prompt_ids(tok, "hi", "none")) == "<|im_start|>hi\n"


def _bad(tmp_path, name, change):
    folder = make_model("plain", tmp_path / name)
    change(folder)
    return folder


def _edit_config(**changes):
    def change(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))

    return change


BAD_FOLDERS = {
    "no config.json": (lambda f: (f / "config.json").unlink(), "no config.json there"),
    "unreadable config.json": (lambda f: (f / "config.json").write_text("{not json"), "config.json is not readable JSON"),
    "unknown architecture": (_edit_config(architectures=["FrobnicatorForCausalLM"], model_type="frobnicator"),
                             "architecture FrobnicatorForCausalLM .* is not a causal language model"),
    "not a causal LM": (_edit_config(architectures=["LlamaForSequenceClassification"]),
                        "LlamaForSequenceClassification .* is not a causal language model"),
    "not a vLLM architecture": (_edit_config(architectures=["BioGptForCausalLM"], model_type="biogpt"),
                                "architecture BioGptForCausalLM is not one this vLLM can generate with"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), "no weights there"),
    "no tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "no usable tokenizer"),
    "a short context": (_edit_config(max_position_embeddings=512), "engine.max_model_len 1024 is longer than the "
                                                                   "model's context of 512 tokens"),
    "no chat template": (lambda f: (f / "chat_template.jinja").unlink(), "has no chat template: set model.chat_template"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_a_bad_model_folder_is_one_line_and_exit_2_before_ray_starts(tmp_path, case, capsys):
    change, message = BAD_FOLDERS[case]
    folder = _bad(tmp_path, "model", change)
    out = tmp_path / "run"
    started = time.monotonic()
    args = ("run", str(LOCAL), "--out", str(out), "--set", f"model.path={folder}")
    # One case in a process of its own: all it prints (the libraries' import-time warnings
    # too; the tokenizer case is the one transformers is loudest in) is the one line.
    proc = s2d(*args, check=False, timeout=120) if case == "no tokenizer" else s2d_here(capsys, *args)
    seconds = time.monotonic() - started
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("s2d: error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()  # nothing started: no run directory, no Ray, no engine
    print(f"{case}: {seconds:.1f} s")  # seen with -s; no timed assertion


def test_model_chat_template_none_or_a_template_lets_a_folder_without_one_through(tmp_path):
    folder = _bad(tmp_path, "model", lambda f: (f / "chat_template.jinja").unlink())
    for value in ("none", "{{ bos_token }}{{ messages[0]['content'] }}"):
        cfg = load_config(LOCAL, [f"model.path={folder}", f"model.chat_template={value}"])
        assert model_facts(cfg).folder == folder.resolve()
    with pytest.raises(Exception, match="must be a Jinja chat template"):
        load_config(LOCAL, [f"model.path={folder}", "model.chat_template=chatml"])


def test_a_model_not_reachable_here_is_held_to_its_familys_context():
    assert family_context("llama-2-70b-chat") == (4096, "known for llama-2 models")
    assert family_context("Meta-Llama-3.1-70B-Instruct")[0] == 131072
    cfg = load_config(ROOT / "jobs" / "paper" / "oasst2-bsm-swap-70b.yaml", ["engine.max_model_len=8192"])
    with pytest.raises(ModelError, match="engine.max_model_len 8192 is longer than the model's context of 4096 tokens "
                                         r"\(known for llama-2 models\)"):  # fmt: skip
        model_facts(cfg, required=False)
    with pytest.raises(ModelError, match="no such folder|not set"):
        model_facts(cfg, required=True)  # a job that runs here needs its model here


@pytest.mark.parametrize("job", PAPER, ids=lambda p: p.stem)
def test_every_paper_job_fits_llama2s_context(job):
    facts = model_facts(load_config(job), required=False)
    assert facts.context == 4096


def test_s2d_check_prints_the_models_context_and_each_stages_prompt(tmp_path):
    folder = make_model("llama2-chat", tmp_path / "llama2")
    proc = s2d("check", str(LOCAL), "--set", f"model.path={folder}", timeout=120)
    out = proc.stdout
    assert "context: model 4096 tokens (config.json)" in out
    for stage in ("generation (System 2, first step)", "training (System 1 prompt)", "evaluation on test (System 1)"):
        assert f"{stage}: " in out and "starts with 1 BOS" in out.split(f"{stage}: ")[1].splitlines()[0], out
    assert "check: no problem found" in out


@pytest.mark.parametrize("job", sorted((ROOT / "jobs" / "local").glob("*.yaml")), ids=lambda p: p.stem)
def test_s2d_check_on_each_local_job(job, capsys):
    proc = s2d_here(capsys, "check", str(job))
    assert proc.returncode == 0, proc.stderr
    assert "prompts: the model's chat template" in proc.stdout and "check: no problem found" in proc.stdout


def test_s2d_estimate_of_each_paper_job_states_checkpoint_size_and_cost():
    for job in PAPER:
        out = s2d("estimate", str(job), timeout=120).stdout
        line = next(line for line in out.splitlines() if line.startswith("checkpoints:"))
        assert "828.0 GB each (51.8 GB per rank)" in line, line
        assert "GiB/s" in line



def test_a_folder_that_passed_is_not_judged_again_until_a_file_in_it_changes(tmp_path, monkeypatch):
    import subprocess
    import sys

    from s2d_ray import preflight

    monkeypatch.setenv("S2D_CACHE", str(tmp_path / "cache"))
    folder = make_model("plain", tmp_path / "model")
    cfg = load_config(LOCAL, [f"model.path={folder}"])
    loads = []
    real = preflight._tokenizer
    monkeypatch.setattr(preflight, "_tokenizer", lambda *a: loads.append(1) or real(*a))
    first = model_facts(cfg)
    again = model_facts(cfg)
    assert len(loads) == 1 and first.tokenizer is not None and again.tokenizer is None
    assert (again.architecture, again.context, again.prompts) == (first.architecture, first.context, first.prompts)
    assert model_facts(cfg, tokenizer=True).tokenizer is not None and len(loads) == 2  # s2d check tokenizes
    # A rerun's check in a process of its own: transformers (and torch) are not even imported.
    probe = (f"import sys; from s2d_ray.config import load_config; from s2d_ray.preflight import model_facts; "
             f"model_facts(load_config({str(LOCAL)!r}, ['model.path={folder}'])); print('transformers' in sys.modules)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.stdout.split()[-1:] == ["False"], proc.stdout + proc.stderr
    # Any change to the folder is judged afresh, and a failed check is never remembered.
    for i, (change, message) in enumerate(((lambda f: (f / "chat_template.jinja").unlink(), "has no chat template"),
                            (lambda f: (f / "model.safetensors").rename(f / "weights.off"), "no weights there"),
                            (_edit_config(architectures=["LlamaForSequenceClassification"]), "not a causal language model"))):  # fmt: skip
        copy = tmp_path / f"copy-{i}"
        shutil.copytree(folder, copy)
        cfg = load_config(LOCAL, [f"model.path={copy}"])
        model_facts(cfg)
        change(copy)
        for _ in range(2):
            with pytest.raises(ModelError, match=message):
                model_facts(cfg)
