"""`s2d runs`: every run directory under a folder, as a table and runs/index.html."""

import json

import pytest

from s2d_ray.cli import main


def _run(folder, config=True, stages=("generate",), evals=None, report=False):
    folder.mkdir(parents=True)
    info = {"stages": {s: {"seconds": 1.0} for s in stages}, "cost": {"tokens": 1234, "total": 0.5, "currency": "USD",
                                                                     "device_hour_price": 4.0}}  # fmt: skip
    info["stages"].setdefault("generate", {}).update(kept=3, inputs=8)
    if config:
        info["config"] = {"task": {"name": "last_letter"}, "method": {"name": "rar2"}, "filter": {"name": "majority"},
                          "model": {"name": "smollm2"}}  # fmt: skip
    (folder / "run.json").write_text(json.dumps(info))
    if evals:
        (folder / "eval.json").write_text(json.dumps(evals))
    if report:
        (folder / "report.html").write_text("<html></html>")


def test_every_run_is_listed_with_how_far_it_got_and_linked_with_its_report(tmp_path, capsys):
    system = lambda acc, tok: {"accuracy": acc, "mean_generated_tokens": tok, "n": 32}  # noqa: E731
    evals = {"metric": "accuracy", "system1": system(0.3, 12.0), "system2": system(0.45, 80.0),
             "distilled": system(0.5, 4.0), "distillability": {"verdict": "closed the gap"}}  # fmt: skip
    _run(tmp_path / "done", stages=("generate", "train", "eval"), evals=evals, report=True)
    _run(tmp_path / "team" / "halfway")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "run.json").write_text("{not json")
    (tmp_path / "link").symlink_to(tmp_path / "done")  # the same run twice: listed once

    main(["runs", str(tmp_path)])
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[1]: line for line in out[1:] if line[:1].isdigit()}
    assert set(rows) == {"broken", "done", "team/halfway"}
    assert "eval" in rows["done"] and "30.0%" in rows["done"] and "50.0%" in rows["done"] and "closed the gap" in rows["done"]
    assert "generate" in rows["team/halfway"] and "3/8" in rows["team/halfway"] and "1,234" in rows["team/halfway"]
    assert "unreadable" in rows["broken"]
    page = (tmp_path / "index.html").read_text()
    assert '<a href="done/report.html">' in page and "team/halfway" in page
    assert page.count("<circle") == 3 and "https://" not in page  # one point per system of the evaluated run; offline


def test_a_missing_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["runs", str(tmp_path / "nowhere")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("s2d: error:") and "no such folder" in err and "\n" not in err


def test_a_pipeline_run_shows_its_tasks_and_its_break_even(tmp_path, capsys):
    evals = {"task": "pipeline", "metric": "accuracy", "distillability": {"verdict": "per task"},
             "break_even": {"requests": 246, "status": "pays"}}  # fmt: skip
    _run(tmp_path / "pipe", stages=("generate", "train", "eval"), evals=evals)
    info = json.loads((tmp_path / "pipe" / "run.json").read_text())
    info["config"]["tasks"] = [{"task": {"name": "triviaqa"}}, {"task": {"name": "coin_flip"}}]
    (tmp_path / "pipe" / "run.json").write_text(json.dumps(info))
    main(["runs", str(tmp_path)])
    row = next(line for line in capsys.readouterr().out.splitlines() if "pipe" in line)
    assert "2 tasks" in row and "per task" in row and "246 requests" in row
