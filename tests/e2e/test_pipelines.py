"""A pipeline job (jobs/local/pipeline.yaml, made small): three tasks, each with its own
method and filter, generated on the same engines, distilled into one model, evaluated
each with its verdict; a no-harm task beside; every piece in eval.json and the report;
`s2d serve`'s routes, one per task on the one model.

On the tiny Llama that answers every prompt "The answer is yes." (tests/conftest.py,
`parrot_model`): what is checked is the pipeline around the answers, at a fraction of the
embedded model's cost (118 s run alone, 83 s in the suite; 239 s on SmolLM2 in the previous
session's suite). Its answers are known, so is what each
filter keeps: every trivia input ("yes", the same in every sample), no last-letter input
("yes" is not two letters: the well-formedness check), and of coin flip's six, its cap."""

import json
import signal

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT, newest_log, s2d

pytestmark = pytest.mark.e2e


def _small(tmp_path, model):
    job = yaml.safe_load((ROOT / "jobs" / "local" / "pipeline.yaml").read_text())
    job["model"] = {**job["model"], "name": "tiny-llama", "path": str(model)}
    job["sampling"]["top_p"] = 1.0  # see tests/conftest.py on_tiny
    trivia, letters, coins = job["tasks"]
    trivia["task"]["limit"] = {"train": 6, "test": 4}
    letters["task"].update(train=4, test=4)
    coins["task"].update(train=6, test=4)
    coins["cap"] = 2
    job["eval"]["no_harm"][0]["task"]["limit"] = {"test": 4}
    job["eval"]["max_tokens"] = 24
    job["sampling"]["max_tokens"] = 32
    job["train"] = {**job["train"], "steps": 2, "workers": 1, "cpus_per_worker": 2}  # one rank: as pipeline_run
    job["engine"] = {**job["engine"], "batch_size": 8, "kv_cache_gib": 1, "max_model_len": 768}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, parrot_model):
    tmp = tmp_path_factory.mktemp("pipeline")
    out = tmp / "run"
    proc = s2d("run", str(_small(tmp, parrot_model)), "--out", str(out))
    return out, proc


def test_one_generation_one_distillation_set_one_model_for_three_tasks(pipeline_dir):
    out, proc = pipeline_dir
    starts = [line for line in newest_log(out, "run").splitlines() if "vLLM uses max_num_seqs" in line]
    assert len(starts) == 2, starts  # the base model once for every task and evaluation, the distilled once
    for label, n in (("trivia", 6), ("last_letter", 4), ("coin_flip", 6)):
        ids = pq.read_table(out / "generate" / label, columns=["id"]).column("id").to_pylist()
        assert len(ids) == n == len(set(ids)), label
    distill = pq.read_table(out / "distill").to_pylist()
    tags = [r["task"] for r in distill]
    assert {t: tags.count(t) for t in set(tags)} == {"trivia": 6, "coin_flip": 2}, tags  # coin flip: its cap
    assert all(r["id"].startswith(f"{r['task']}/") for r in distill)
    gen = json.loads((out / "run.json").read_text())["stages"]["generate"]
    assert set(gen["tasks"]) == {"trivia", "last_letter", "coin_flip"} and gen["kept"] == len(distill) > 0
    assert list((out / "model").glob("*.safetensors"))
    for label in ("trivia", "last_letter", "coin_flip"):
        assert f"done {label}: accuracy" in proc.stdout


def test_eval_json_holds_each_task_the_no_harm_check_and_the_break_even(pipeline_dir):
    out, _ = pipeline_dir
    ev = json.loads((out / "eval.json").read_text())
    assert set(ev["tasks"]) == {"trivia", "last_letter", "coin_flip"}
    for label, entry in ev["tasks"].items():
        assert {"system1", "system2", "distilled", "verdict"} <= set(entry), label
        assert entry["distilled"]["n"] == 4 and entry["paired"]["distilled_vs_system1"]["n"] == 4
    assert ev["tasks"]["trivia"]["method"] == "s2a" and ev["tasks"]["coin_flip"]["method"] == "rar2"
    harm = ev["no_harm"]["gsm8k"]
    assert harm["base"]["system1"]["n"] == harm["distilled"]["system1"]["n"] == 4 and harm["regressed"] in (True, False)
    assert ev["break_even"]["per"].startswith("pipeline request")
    page = (out / "report.html").read_text()
    assert "<h2>Tasks</h2>" in page and "No harm elsewhere?" in page and "coin_flip" in page
    examples = page.split("<h2>Examples</h2>")[1].split("<h2>")[0]
    for label in ev["tasks"]:  # each task's examples, from its own test inputs
        assert f"<h3>{label}</h3>" in examples
    assert examples.count('class="ex-row') == sum(len(e["examples"]["rows"]) for e in ev["tasks"].values()) > 0


def test_each_task_is_a_route_on_the_one_model(pipeline_dir):
    from s2d_ray.serving.routes import load_run

    out, _ = pipeline_dir
    routes = load_run(out)
    assert [r.name for r in routes] == ["local-pipeline.trivia", "local-pipeline.last_letter", "local-pipeline.coin_flip"]
    assert {r.models.get("distilled") for r in routes} == {str(out / "model")}
    assert [r.cfg.task.name for r in routes] == ["triviaqa", "last_letter", "coin_flip"]
    assert all(r.chosen_by == "evaluation" and r.mode in r.modes for r in routes)


def test_a_served_pipeline_answers_each_task_on_its_route_as_evaluated(pipeline_dir):
    """`s2d serve` of the pipeline's run: one route per task on the one model, each in the
    mode its own evaluation chose, each answering its test inputs as evaluation did."""
    from openai import OpenAI

    from s2d_ray.serving.routes import load_run
    from tests.conftest import Command

    out, _ = pipeline_dir
    chosen = {r.name: r.mode for r in load_run(out)}
    server = Command("serve", [str(out), "--port", "8732"])
    try:
        server.wait_for(r"serving: http://127\.0\.0\.1:8732/v1")
        client = OpenAI(base_url="http://127.0.0.1:8732/v1", api_key="none", max_retries=0, timeout=600)
        models = {m.id: m.model_extra["s2d"] for m in client.models.list().data}
        assert {name: models[name]["mode"] for name in chosen} == chosen
        for label in ("trivia", "last_letter", "coin_flip"):
            name = f"local-pipeline.{label}"
            evaluated = pq.read_table(out / "eval" / f"{label}-distilled").to_pylist()
            inputs = {r["id"]: r["input"] for r in pq.read_table(out / "eval" / f"{label}-base", columns=["id", "input"]).to_pylist()}
            for row in evaluated[:2]:
                reply = client.chat.completions.with_raw_response.create(
                    model=f"{name}:distilled", messages=[{"role": "user", "content": inputs[row["id"]]}], max_tokens=24)
                answer = reply.parse()
                assert reply.headers["x-s2d-route-mode"] == "distilled" and answer.model_extra["s2d"]["route"] == name
                assert answer.choices[0].message.content == row["distilled_outputs"][0], label
            # The route's own mode, unnamed: the one its evaluation chose.
            reply = client.chat.completions.with_raw_response.create(
                model=name, messages=[{"role": "user", "content": inputs[evaluated[0]["id"]]}])
            assert reply.headers["x-s2d-route-mode"] == chosen[name]
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=300) == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
