"""MLflow tracking on a local file store: settings, stage figures, loss per step, evaluation,
the report; one MLflow run per run directory; a server that is down does not stop a run."""

import pytest

from s2d_ray import tracking
from s2d_ray.config import load_config
from s2d_ray.errors import ConfigError
from s2d_ray.rundir import RunDir
from tests.conftest import ROOT

JOB = ROOT / "jobs" / "local" / "last-letter-rar2.yaml"


def test_a_tracking_uri_typo_fails_at_load():
    with pytest.raises(ConfigError, match="not an MLflow tracking URI"):
        load_config(JOB, ["tracking.mlflow=true", "tracking.uri=htps://mlflow:5000"])


def test_every_figure_goes_to_one_mlflow_run_per_run_directory(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    cfg = load_config(JOB, ["tracking.mlflow=true", f"tracking.uri={tmp_path / 'mlruns'}", "tracking.experiment=exp"])
    run = RunDir(tmp_path / "run").create()
    run.update_run(config={})
    said = []
    reasons = {"respond: prompt of 120 tokens (limit 100), 'x'": 2}  # free text: not a valid MLflow name as it is
    tracking.stage(cfg, run, "generate", {"kept": 6, "inputs": 32, "agreement_histogram": {"2/3": 5},
                                          "failure_reasons": reasons}, said.append)  # fmt: skip
    curve = [[1, 5.5, 20.0], [2, 1.9, 23.0], [3, 1.4, 25.0]]
    tracking.stage(cfg, run, "train", {"steps": 3, "final_loss": 1.4, "loss_curve": curve}, said.append)
    result = {"metric": "accuracy", "system1": {"accuracy": 0.25, "n": 32}, "distilled": {"accuracy": 0.5, "n": 32},
              "fidelity": {"n": 20, "system1": 0.05, "distilled": 0.55}, "examples": {"rows": []}}  # fmt: skip
    tracking.evaluation(cfg, run, result, said.append)
    run.report_html.write_text("<html>report</html>")
    tracking.report(cfg, run, said.append)
    assert said == []

    client = mlflow.MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("exp").experiment_id])  # one run for all calls
    assert found.info.run_id == run.read_run()["tracking"]["mlflow_run_id"]
    assert found.info.status == "FINISHED"
    assert found.data.params["filter.samples"] == "3" and found.data.params["model.name"] == "smollm2"
    metrics = found.data.metrics
    assert metrics["generate.kept"] == 6 and metrics["generate.agreement_histogram.2/3"] == 5
    assert metrics["generate.failure_reasons.respond_ prompt of 120 tokens _limit 100__ _x_"] == 2
    assert metrics["eval.distilled.accuracy"] == 0.5 and metrics["eval.fidelity.distilled"] == 0.55
    losses = client.get_metric_history(found.info.run_id, "train.loss")
    assert [(m.step, m.value) for m in sorted(losses, key=lambda m: m.step)] == [(1, 5.5), (2, 1.9), (3, 1.4)]
    assert {a.path for a in client.list_artifacts(found.info.run_id)} >= {"report.html", "run.json"}


def test_a_tracking_server_that_is_down_is_one_line_and_the_run_goes_on(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = load_config(JOB, ["tracking.mlflow=true", "tracking.uri=http://127.0.0.1:9"])  # nothing listens on port 9
    run = RunDir(tmp_path / "run").create()
    said = []
    tracking.stage(cfg, run, "generate", {"kept": 1}, said.append)
    assert len(said) == 1 and said[0].startswith("tracking: MLflow could not log the generate stage (")
    assert said[0].endswith("; the run goes on") and "\n" not in said[0]


def test_tracking_without_mlflow_installed_is_one_line_where_the_job_runs(monkeypatch):
    import importlib.util

    from s2d_ray.errors import S2DError

    cfg = load_config(JOB, ["tracking.mlflow=true"])  # loads (s2d submit: the cluster's image has MLflow)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(S2DError, match=r"tracking.mlflow needs MLflow: pip install 's2d-ray\[tracking\]'"):
        tracking.check(cfg)
