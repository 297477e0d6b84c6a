"""`s2d run` of `make run`'s job (TriviaQA, S2A, USC) through every stage on the real stack:
Ray, vLLM, DeepSpeed ZeRO-3, SmolLM2; with a no-harm task evaluated beside it."""

import json

import pyarrow.parquet as pq
import pytest

from tests.conftest import newest_log

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def run_dir(pipeline_run):
    return pipeline_run


def test_run_directory_contract(run_dir):
    out, proc = run_dir
    assert f"run directory: {out}" in proc.stdout
    for name in ("generate", "distill", "model", "eval.json", "report.html", "run.json"):
        assert (out / name).exists(), name
    assert (out / "model" / "config.json").exists()
    assert list((out / "model").glob("*.safetensors"))
    assert (out / "model" / "tokenizer.json").exists()


def test_each_model_starts_one_engine_per_run(run_dir):
    out, proc = run_dir
    # The base model is evaluated beside generation (6 test inputs, 4 of the no-harm task).
    assert "and 10 of eval/ with the same engines" in proc.stderr
    assert "reusing eval/base/, eval/no_harm-coin_flip-base/" in proc.stderr
    starts = [line for line in newest_log(out, "run").splitlines() if "vLLM uses max_num_seqs" in line]
    assert len(starts) == 2, starts  # the base model once (generation + its evaluation), the distilled once


def test_the_terminal_shows_s2d_progress_and_the_log_file_everything_else(run_dir):
    out, proc = run_dir
    shown = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(shown) <= 40, "\n".join(shown)
    assert all(line.startswith("[s2d] ") for line in proc.stderr.splitlines() if line.strip()), proc.stderr
    assert f"[s2d] logs: {out}/logs/run-" in proc.stderr
    for stage in ("generate + base eval: 22/22 inputs", "train: 2/2 steps", "eval distilled: 10/10 inputs"):
        assert f"[s2d] {stage} (100%)" in proc.stderr, stage  # each stage's last progress line
    log = newest_log(out, "run")
    for line in ("RayTrainWorker", "train step 2/2", "MapWorker(MapBatches(GeneratorActor))", "[s2d] generate: kept"):
        assert line in log, line  # the ranks' and engines' output, and s2d's own lines
    assert "[repeated" not in log  # Ray's merging of identical lines is off: nothing dropped
    assert log.count("train step 2/2") == 1  # and nothing doubled (Ray Train's print patch tees)
    assert "shm_comm" not in log  # DeepSpeed's CPU all-reduce op, never used in training, is not compiled


def test_generate_has_every_input_once_with_samples_votes_and_tokens(run_dir):
    out, _ = run_dir
    table = pq.read_table(out / "generate")
    ids = table.column("id").to_pylist()
    assert len(ids) == 12 and len(set(ids)) == 12
    for row in table.to_pylist():
        assert len(row["system2_answers"]) == 3 and len(row["system2_outputs"]) == 3
        assert row["vote_total"] == 3 and row["system2_tokens"] > 0
        steps = row["system2_tokens_rewrite"] + row["system2_tokens_answer"] + row["system2_tokens_usc"]
        assert row["system2_tokens"] == steps  # S2A's two steps, and USC's pick
        # An answer is voted on only when well-formed for its input, and a dropped one says why.
        for answer, why in zip(row["system2_answers"], row["system2_dropped"]):
            assert (answer is None) == (why is not None), (answer, why)
            assert why in (None, "no answer") or why.startswith('malformed "'), why
        assert not row["kept"] or row["vote_answer"] in row["system2_answers"]


def test_distillation_targets_hold_only_the_final_answer(run_dir):
    out, _ = run_dir
    gen = {r["id"]: r for r in pq.read_table(out / "generate").to_pylist()}
    distill = pq.read_table(out / "distill").to_pylist()
    assert distill, "the vote kept nothing: the test cannot check training on real targets"
    for row in distill:
        g = gen[row["id"]]
        assert g["kept"] and row["prompt"] == g["input"]
        assert row["target"] == f"Answer: {g['vote_answer']}"
        for sample in g["system2_outputs"]:  # no intermediate text leaks into the target
            assert sample not in row["target"] or sample == row["target"]
        assert "(rephrased)" not in row["target"] and "\n" not in row["target"]


def test_eval_and_run_json(run_dir):
    out, _ = run_dir
    ev = json.loads((out / "eval.json").read_text())
    for system in ("system1", "system2", "distilled"):
        m = ev[system]
        assert m["n"] == 6 and 0.0 <= m["accuracy"] <= 1.0
        assert m["mean_generated_tokens"] > 0 and m["seconds"] > 0
    assert ev["system2"]["mean_generated_tokens"] > ev["system1"]["mean_generated_tokens"]
    assert ev["distillability"]["verdict"] and "McNemar" in ev["distillability"]["text"]
    assert ev["paired"]["distilled_vs_system1"]["n"] == 6 and 0 <= ev["paired"]["distilled_vs_system1"]["p"] <= 1
    if ev["fidelity"]:  # System 2 gave a well-formed answer somewhere
        assert ev["fidelity"]["distilled_baseline"] >= ev["fidelity"]["constant_baseline"] > 0
    assert ev["break_even"]["tokens_per_answer"]["system2"] > ev["break_even"]["tokens_per_answer"]["distilled"]
    harm = ev["no_harm"]["coin_flip"]  # a task the model was not distilled on, base vs distilled
    assert harm["base"]["system1"]["n"] == harm["distilled"]["system1"]["n"] == 4
    assert harm["regressed"] in (True, False) and harm["tests"]["system1"]["n"] == 4
    info = json.loads((out / "run.json").read_text())
    assert info["config"]["method"]["name"] == "s2a"
    assert set(info["stages"]) == {"generate", "train", "eval"}
    gen = info["stages"]["generate"]
    assert gen["inputs"] == 12 and 0 < gen["kept"] <= 12
    assert sum(gen["agreement_histogram"].values()) == 12
    assert info["stages"]["train"]["steps"] == 2 and info["versions"]["ray"] == "2.60.0"
    assert "rewrite" in info["prompts"]["s2a"]
    # The estimate made before the run sits beside the measurement.
    assert set(info["estimate"]["stages"]) == {"generate", "train", "eval"}
    assert info["stages"]["generate"]["tokens"] > 0 and info["stages"]["train"]["tokens"] > 0
    assert info["stages"]["generate"]["samples_drawn"] == 12 * 3
    uncounted = info["stages"]["generate"]["samples_not_counted"]
    assert uncounted["no answer"] + uncounted["malformed"] <= 12 * 3
    assert info["stages"]["generate"]["diversity"]["top_share"] <= 1.0


def test_report_is_self_contained_and_honest(run_dir):
    out, _ = run_dir
    page = (out / "report.html").read_text()
    assert "<svg" in page and "<script" not in page and "http://" not in page.replace("http://www.w3.org", "")
    assert "smoke-scale" in page
    assert "System 1" in page and "System 2" in page and "Distilled" in page
    assert "Estimate beside measurement" in page and "tokens per input by step" in page
    assert "When does distillation pay?" in page and "McNemar" in page and "No harm elsewhere?" in page


def test_the_run_is_tracked_in_mlflow(run_dir, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading MLflow 3's file store, as s2d writes it
    out, _ = run_dir
    client = mlflow.MlflowClient(tracking_uri=f"file://{out}-mlruns")
    (found,) = client.search_runs([client.get_experiment_by_name("s2d-ray").experiment_id])
    assert found.data.params["method.name"] == "s2a" and found.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "train.loss")] == [1, 2]
    assert "eval.distilled.accuracy" in found.data.metrics and "generate.kept" in found.data.metrics
    assert "report.html" in {a.path for a in client.list_artifacts(found.info.run_id)}
