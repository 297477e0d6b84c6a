"""Experiment tracking with MLflow (`tracking.mlflow: true`, the `s2d-ray[tracking]` extra).

One MLflow run per run directory: its id is kept in run.json, so a resumed or later
command (`s2d train`, `s2d eval`) adds to the same MLflow run. Logged: the job's settings
(parameters), each stage's figures, the training loss per step, the evaluation and the
report with eval.json and run.json (artifacts). MLflow's client API only, no global
active run. A tracking failure (a server down) is one line and never stops the run: the
run directory holds everything, and the next command logs again."""

from __future__ import annotations

import os
import re
from pathlib import Path

from s2d_ray.config import JobConfig, config_dict
from s2d_ray.errors import S2DError
from s2d_ray.rundir import RunDir

PARAM_CHARS = 500  # MLflow limits a parameter's value; longer ones (prompts) are cut


def uri(cfg: JobConfig, run: RunDir) -> str:
    """The tracking URI: the job's, $MLFLOW_TRACKING_URI, or mlruns/ beside the run directory."""
    value = cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or str(run.root.parent / "mlruns")
    if "://" not in value and not value.startswith(("file:", "databricks")):
        value = Path(value).resolve().as_uri()
    if value.startswith("file:"):
        # MLflow 3 keeps its file store (no database needed, offline) behind this switch.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    # A server that is down costs seconds, not MLflow's default minutes of retries, while
    # the cluster waits between stages.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    return value


def check(cfg: JobConfig) -> None:
    """Where a command runs the job (not `s2d submit`, whose cluster image has the extra)."""
    import importlib.util

    if cfg.tracking.mlflow and importlib.util.find_spec("mlflow") is None:
        raise S2DError("tracking.mlflow needs MLflow: pip install 's2d-ray[tracking]' (or set tracking.mlflow: false)")


def flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _numbers(data: dict, prefix: str) -> dict[str, float]:
    """Numeric figures by MLflow-safe names (keys such as failure reasons are free text)."""
    return {re.sub(r"[^\w./\- ]", "_", k)[:250]: float(v) for k, v in flatten(data, prefix).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}  # fmt: skip


class MlflowRun:
    """The run directory's MLflow run (created on first use)."""

    def __init__(self, cfg: JobConfig, run: RunDir):
        from mlflow import MlflowClient

        self.cfg, self.run, self.uri = cfg, run, uri(cfg, run)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.id = self._find() or self._create()

    def _find(self) -> str | None:
        known = self.run.read_run().get("tracking", {})
        if known.get("uri") != self.uri or not known.get("mlflow_run_id"):
            return None
        try:
            found = self.client.get_run(known["mlflow_run_id"])
        except Exception:  # another store: start a new one
            return None
        return known["mlflow_run_id"] if found.info.lifecycle_stage == "active" else None  # deleted: a new one

    def _create(self) -> str:
        from mlflow.entities import Param

        name = self.cfg.tracking.experiment
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        created = self.client.create_run(experiment_id, run_name=self.cfg.name,
                                         tags={"s2d.run_dir": str(self.run.root), "s2d.task": self.cfg.task.name,
                                               "s2d.method": self.cfg.method.name})  # fmt: skip
        # Recorded at once: a failure below must not make the next call create another run.
        self.run.update_run(tracking={"uri": self.uri, "mlflow_run_id": created.info.run_id})
        params = [Param(k, str(v)[:PARAM_CHARS]) for k, v in sorted(flatten(config_dict(self.cfg)).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
            self.client.log_batch(created.info.run_id, params=params[i : i + 100])
        return created.info.run_id

    def metrics(self, values: dict[str, float], step: int = 0, series: list[tuple[int, dict[str, float]]] = ()) -> None:
        """`values` at `step`, and `series`: (step, values) pairs; 1000 a request."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in values.items()]
        batch += [Metric(k, v, now, s) for s, figures in series for k, v in figures.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.id, metrics=batch[i : i + 1000])

    def artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            if path.exists():
                self.client.log_artifact(self.id, str(path))


def _safely(cfg: JobConfig, run: RunDir, log, what: str, action) -> None:
    if not cfg.tracking.mlflow:
        return
    try:
        action(MlflowRun(cfg, run))
    except Exception as err:  # the run goes on: its results are in the run directory
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log(f"tracking: MLflow could not log {what} ({first}); the run goes on")


def stage(cfg: JobConfig, run: RunDir, name: str, data: dict, log=print) -> None:
    """A stage's figures; for training also its loss and throughput per step."""

    def send(ml: MlflowRun) -> None:
        curve = [(int(s), {"train.loss": loss, "train.tokens_per_s_per_worker": rate})
                 for s, loss, rate in data.get("loss_curve") or []]  # fmt: skip
        ml.metrics(_numbers({k: v for k, v in data.items() if k != "loss_curve"}, f"{name}."), series=curve)

    _safely(cfg, run, log, f"the {name} stage", send)


def evaluation(cfg: JobConfig, run: RunDir, result: dict, log=print) -> None:
    """Every system's scores and the fidelity; the report and the run's records as artifacts."""
    systems = ("system1", "system2", "distilled", "fidelity")
    figures = {k: v for k, v in result.items() if k in systems and v}
    if result.get("task") == "pipeline":  # each task's, by label
        figures = {label: {k: v for k, v in t.items() if k in systems and v} for label, t in result["tasks"].items()}
    _safely(cfg, run, log, "the evaluation", lambda ml: ml.metrics(_numbers(figures, "eval.")))


def report(cfg: JobConfig, run: RunDir, log=print) -> None:
    """The report, eval.json and run.json as artifacts; the MLflow run is then finished (a
    later command on the run directory may still add to it)."""

    def send(ml: MlflowRun) -> None:
        ml.artifacts([run.report_html, run.eval_json, run.run_json])
        ml.client.set_terminated(ml.id)

    _safely(cfg, run, log, "the report", send)
