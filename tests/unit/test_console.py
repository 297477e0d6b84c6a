"""The quiet terminal: s2d's own lines and progress shown, everything else in RUN/logs/."""

import io
import json
import re
import subprocess
import sys
import textwrap

from s2d_ray.console import Console, progress
from s2d_ray.training import StepWatch, read_steps
from tests.conftest import ROOT


def _plain(every_s: float = 1000.0) -> tuple[Console, io.StringIO]:
    term = io.StringIO()
    return Console(term, every_s=every_s, tty=False), term


def test_a_plain_stage_prints_its_last_figures_once_when_it_ends():
    console, term = _plain()
    with console.progress("generate", 64, "inputs") as tracker:
        tracker.update(16, "kept 4")
        tracker.update(64, "kept 9, 120 tok/s")
    tracker.close()  # a second close says nothing more
    lines = term.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("[s2d] generate: 64/64 inputs (100%), kept 9, 120 tok/s, ")


def test_a_plain_stage_prints_a_line_every_interval_with_an_eta():
    console, term = _plain(every_s=0.0)
    tracker = console.progress("eval distilled", 10, "inputs")
    tracker.update(5, "")
    tracker.close()
    lines = term.getvalue().splitlines()
    assert lines[0].startswith("[s2d] eval distilled: 5/10 inputs (50%)") and "ETA" in lines[0], lines
    assert "10/10" not in lines[0] and "5/10" in lines[-1]


def test_progress_of_a_plain_log_function_shows_nothing():
    seen = []
    with progress(seen.append, "generate", 3, "inputs") as tracker:
        tracker.update(3, "done")
    assert seen == []


SCRIPT = """
import os, sys
from pathlib import Path
from s2d_ray.console import terminal
with terminal(Path(sys.argv[1]), "run", verbose=sys.argv[2] == "1") as log:
    log("own line")
    print("library line", flush=True)
    os.system("echo child process line")
    os.write(2, b"native stderr line\\n")
    if sys.argv[3] == "1":
        raise RuntimeError("boom")
print("after the command")
"""


def _script(tmp_path, verbose: bool, fail: bool = False):
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(tmp_path / "logs"), str(int(verbose)), str(int(fail))],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    (log,) = (tmp_path / "logs").glob("run-*.log")
    return proc, log.read_text()


def test_the_terminal_shows_own_lines_and_the_log_file_gets_everything(tmp_path):
    proc, log = _script(tmp_path, verbose=False)
    assert proc.returncode == 0, proc.stderr
    assert "[s2d] own line" in proc.stderr and "[s2d] logs: " in proc.stderr
    shown = proc.stdout + proc.stderr
    for line in ("library line", "child process line", "native stderr line"):
        assert line not in shown and line in log, line
    assert "[s2d] own line" in log
    assert proc.stdout == "after the command\n"  # restored once the command ends


def test_verbose_also_shows_everything_live(tmp_path):
    proc, log = _script(tmp_path, verbose=True)
    shown = proc.stdout + proc.stderr
    for line in ("library line", "child process line", "native stderr line"):
        assert line in shown and line in log, line


def test_an_error_leaves_its_traceback_in_the_log_and_its_path_on_the_terminal(tmp_path):
    proc, log = _script(tmp_path, verbose=False, fail=True)
    assert proc.returncode != 0
    assert "RuntimeError: boom" in log and "Traceback" in log
    assert "[s2d] this command's log: " in proc.stderr


def test_read_steps_keeps_the_last_run_of_each_step_and_the_resumes(tmp_path):
    path = tmp_path / "steps.jsonl"
    records = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"resumed": 1, "steps": 4}, {"step": 2, "loss": 2.4}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 3, "lo')  # the last cut by a kill
    steps, resumed = read_steps(path)
    assert [(r["step"], r["loss"]) for r in steps] == [(1, 3.0), (2, 2.4)]
    assert resumed == [1]
    assert read_steps(tmp_path / "missing.jsonl") == ([], [])


def test_the_driver_shows_rank_0s_steps_and_resumes(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps({"resumed": 0, "steps": 3}) + "\n")  # an earlier command's: not shown again
    console, term = _plain()
    with StepWatch(path, 3, console):
        with open(path, "a") as f:
            f.write(json.dumps({"resumed": 1, "steps": 3}) + "\n")
            for step in (2, 3):
                f.write(json.dumps({"step": step, "loss": 1.0 / step, "tokens": 100, "seconds": 2.0, "padding": 0.1}) + "\n")
    lines = term.getvalue().splitlines()
    assert lines[0] == "[s2d] train: resumed from the checkpoint of step 1 of 3"
    assert lines[-1].startswith("[s2d] train: 3/3 steps (100%), loss 0.3333, 50 tok/s/worker (padding 10%)")


def test_on_a_terminal_a_live_bar_then_one_line_per_step_and_the_stage_summary(tmp_path):
    path = tmp_path / "steps.jsonl"
    term = io.StringIO()
    console = Console(term, tty=True)
    with StepWatch(path, 2, console):
        with open(path, "a") as f:
            for step in (1, 2):
                f.write(json.dumps({"step": step, "loss": 1.0, "tokens": 10, "seconds": 1.0, "padding": 0.0}) + "\n")
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", term.getvalue())
    lines = [line.strip() for line in shown.replace("\r", "\n").splitlines() if line.strip().startswith("[s2d]")]
    assert lines == ["[s2d] train step 1/2: loss 1.0000, 10 tok/s/worker (padding 0%)",
                     "[s2d] train step 2/2: loss 1.0000, 10 tok/s/worker (padding 0%)",
                     lines[-1]] and lines[-1].startswith("[s2d] train: 2/2 steps (100%)"), lines  # fmt: skip
