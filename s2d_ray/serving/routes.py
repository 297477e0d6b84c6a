"""Routes: one per run directory, named by its job, answering in the mode its own
evaluation proved (distilled, System 2 or System 1)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from s2d_ray.config import JobConfig, parse_config
from s2d_ray.errors import S2DError
from s2d_ray.evaluation import aligned, better, correctness, paired_tests, said, worse
from s2d_ray.rundir import RunDir

MODES = ("distilled", "system2", "system1")


@dataclass
class Route:
    name: str
    run: str  # the run directory
    cfg: JobConfig
    mode: str
    why: str  # the choice, in one sentence, with the figures it rests on
    models: dict[str, str]  # "base" and, where trained, "distilled": model folders
    figures: dict = field(default_factory=dict)  # the paired tests behind the choice
    chosen_by: str = "evaluation"  # or "--route", or "no evaluation"

    @property
    def modes(self) -> tuple[str, ...]:
        """The modes this route can answer in (distilled only with a trained model)."""
        return tuple(m for m in MODES if m != "distilled" or "distilled" in self.models)

    def model_of(self, mode: str) -> str:
        return "distilled" if mode == "distilled" else "base"

    def describe(self) -> dict:
        """The route's entry in /v1/models and the start-up line's figures."""
        return {"mode": self.mode, "chosen_by": self.chosen_by, "why": self.why, "modes": list(self.modes),
                "run_dir": self.run, "task": self.cfg.task.name, "method": self.cfg.method.name,
                "tests": self.figures}  # fmt: skip


def choose_mode(correct: dict[str, list[bool]]) -> tuple[str, str, dict]:
    """The cheapest mode the evaluation did not show to be worse, from per-input scores on
    the same inputs (`system1`, and `system2`/`distilled` where evaluated): distilled when
    McNemar's test finds it worse than neither System 2 nor System 1; else System 2 when
    it beat System 1 significantly; else System 1."""
    figures = paired_tests(correct)
    tests = {k: v for k, v in figures.items() if "_vs_" in k}

    d_tests = [k for k in ("distilled_vs_system2", "distilled_vs_system1") if k in tests]
    if d_tests and not any(worse(tests[k]) for k in d_tests):
        return "distilled", "the distilled model was not worse: " + "; ".join(said(tests, k) for k in d_tests), figures
    s2 = tests.get("system2_vs_system1")
    lost = [said(tests, k) for k in d_tests if worse(tests[k])]
    if s2 is not None and better(s2):
        why = "System 2 beat System 1: " + said(tests, "system2_vs_system1")
        return "system2", why + ("; the distilled model did not keep up: " + "; ".join(lost) if lost else ""), figures
    why = "System 2 did not beat System 1" + (f": {said(tests, 'system2_vs_system1')}" if s2 else " (not evaluated)")
    return "system1", why + ("; the distilled model was worse: " + "; ".join(lost) if lost else ""), figures


def _scores(run: RunDir, cfg: JobConfig, label: str, sub: JobConfig) -> dict[str, list[bool]] | None:
    """Per-input correctness of each evaluated system on one task's test inputs, aligned
    (`cfg` the run's job, `sub` the task's own)."""
    from s2d_ray.generation import load_results

    folder = lambda which: run.eval_dir / cfg.eval_name(label, which)  # noqa: E731
    base = load_results(folder("base")) if folder("base").exists() else None
    if base is None:
        return None
    distilled = load_results(folder("distilled")) if folder("distilled").exists() else None
    scores = {name: correctness(table, name, sub.task)
              for name, table in (("system1", base), ("system2", base), ("distilled", distilled))
              if table is not None and f"{name}_answers" in table.column_names}  # fmt: skip
    return aligned(scores)


def load_route(run_dir: str | Path, override: str | None = None) -> Route:
    """The route of one finished single-task run directory (the first task's of a
    pipeline); `override`: a mode chosen by hand."""
    route = load_run(run_dir)[0]
    return route if override is None else overridden(route, override)


def load_run(run_dir: str | Path) -> list[Route]:
    """The routes of one finished run directory: one, named by its job; a pipeline's, one
    per task on the one distilled model, named JOB.LABEL."""
    from s2d_ray.models import resolve_model

    run = RunDir(run_dir)
    if not run.run_json.exists():
        raise S2DError(f"{run_dir}: not a run directory (no run.json); give the folder `s2d run` wrote")
    try:
        info = json.loads(run.run_json.read_text())
        cfg = parse_config(info["config"], f"{run_dir}/run.json")
    except (ValueError, KeyError) as err:
        raise S2DError(f"{run_dir}/run.json: unreadable job settings ({type(err).__name__}: {err})") from None
    models = {"base": str(resolve_model(cfg.model.name, cfg.model.path))}
    if run.model_ready():
        models["distilled"] = str(run.model)
    routes = []
    for label, sub in cfg.entries():
        scores = _scores(run, cfg, label, sub)
        if scores:
            mode, why, figures = choose_mode(scores)
            chosen_by = "evaluation"
        else:
            mode, figures, chosen_by = "system1", {}, "no evaluation"
            why = "this run has no evaluation (run `s2d eval`); System 1 until one says otherwise"
        if mode == "distilled" and "distilled" not in models:  # evaluated, then model/ removed
            mode, why = "system1", why + "; but model/ is gone"
        name = f"{cfg.name}.{label}" if cfg.tasks else cfg.name
        routes.append(Route(name, str(run.root), sub, mode, why, dict(models), figures, chosen_by))
    return routes


def overridden(route: Route, mode: str) -> Route:
    """The route answering in `mode` whatever its evaluation said (`--route`)."""
    if mode not in route.modes:
        raise S2DError(f"--route {route.name}={mode}: this run has no distilled model (no model/); "
                       f"choose {' or '.join(route.modes)}")  # fmt: skip
    route.mode, route.chosen_by = mode, "--route"
    return route


def load_routes(run_dirs: list[str], overrides: dict[str, str]) -> list[Route]:
    routes = [r for d in run_dirs for r in load_run(d)]
    names = [r.name for r in routes]
    for name in names:
        if names.count(name) > 1:
            raise S2DError(f"two run directories are jobs named {name!r}: a route is named by its job; give one of them")
    unknown = set(overrides) - set(names)
    if unknown:
        raise S2DError(f"--route {sorted(unknown)[0]}: no route of that name (routes: {', '.join(names)})")
    return [overridden(r, overrides[r.name]) if r.name in overrides else r for r in routes]


def parse_route_flags(flags: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for flag in flags:
        name, sep, mode = flag.partition("=")
        if not sep or not name or mode not in MODES:
            raise S2DError(f"--route {flag!r}: expected NAME=distilled|system2|system1")
        out[name] = mode
    return out
