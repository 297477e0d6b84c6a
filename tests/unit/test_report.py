"""report.html: what it shows, that nothing in it overlaps, and that a real browser renders it."""

import json
import re
import shutil
import subprocess

import pyarrow as pa
import pytest

from s2d_ray.evaluation import examples, fidelity
from s2d_ray.report import render, write_report
from s2d_ray.rundir import RunDir
from s2d_ray.tasks.last_letter import LastLetter

SYSTEMS = ("system1", "system2", "distilled")


def _system(acc: float, tokens: float, steps: dict) -> dict:
    return {"accuracy": acc, "accuracy_stderr": 0.05, "mean_generated_tokens": tokens, "tokens_per_step": steps,
            "parse_failures": 0, "n": 40, "seconds": 3.0}  # fmt: skip


def _row(i: int, s1: bool, d: bool) -> dict:
    side = lambda ok, a: {"answer": a if ok else "zz", "output": f"Answer: {a if ok else 'zz'}", "correct": ok}  # noqa: E731
    return {"id": f"t{i}", "input": f"question {i}", "gold": "ab", "change": "fixed" if d and not s1 else "broke" if s1 and not d else "same",
            "system1": side(s1, "ab"), "distilled": side(d, "ab"),
            "system2": {**side(True, "ab"), "steps": {"rephrase": f"rephrased question {i}"}}}  # fmt: skip


def _fidelity(s1: float, d: float, verdict: str = "absorbed") -> dict:
    return {"n": 30, "constant_answer": "ab", "constant_baseline": 0.1, "test": "exact binomial, one-sided", "alpha": 0.05,
            "system1": s1, "system1_chance": 0.05, "system1_baseline": 0.1, "system1_p": 0.2,
            "distilled": d, "distilled_chance": 0.08, "distilled_baseline": 0.1, "distilled_p": 1e-9,
            "distilled_vs_system1": {"n": 30, "a": d, "b": s1, "only_a": 15, "only_b": 0, "p": 6e-5},
            "absorbed": verdict == "absorbed", "verdict": verdict}  # fmt: skip


def _run_dir(tmp_path, same_spot: bool = True) -> RunDir:
    run = RunDir(tmp_path / "run").create()
    # The worst case for labels: all three systems on one spot of the scatter plot.
    tokens = {k: 20.0 for k in SYSTEMS} if same_spot else {"system1": 5.0, "system2": 60.0, "distilled": 5.0}
    evals = {
        "task": "last_letter", "method": "rar2", "split": "test", "metric": "accuracy",
        **{k: _system(0.5, tokens[k], {"answer": tokens[k]} if k != "system2" else {"rephrase": 8.0, "respond": 12.0})
           for k in SYSTEMS},
        "distillability": {"verdict": "did not help", "text": "Distillation did not help here."},
        "fidelity": _fidelity(0.2, 0.7),
        "examples": {"n": 40, "fixed": 3, "broke": 1,
                     "rows": [_row(0, False, True), _row(1, False, True), _row(2, True, False), _row(3, True, True)]},
    }  # fmt: skip
    run.eval_json.write_text(json.dumps(evals))
    hist = {f"{k}/8": 3 for k in range(9)} | {f"{k}/4": 2 for k in range(5)}  # adaptive: mixed sample counts
    run.update_run(
        config={"task": {"name": "last_letter"}, "method": {"name": "rar2"}, "model": {"name": "smollm2"},
                "filter": {"name": "majority", "samples": 8}},
        stages={"generate": {"inputs": 40, "kept": 20, "agreement_histogram": hist, "seconds": 9.0, "tokens": 900,
                             "tokens_per_input_per_step": {"rephrase": 60.0, "respond": 100.0}},
                "train": {"steps": 30, "seconds": 20.0, "loss_curve": [[s, 3.0 / s, 40.0] for s in range(1, 31)]},
                "eval": {"seconds": 5.0, "tokens": 300}},
    )  # fmt: skip
    return run


def test_the_report_shows_examples_fidelity_loss_votes_and_tokens_per_step(tmp_path):
    page = render(_run_dir(tmp_path))
    assert "fixed 3</b>" in page and "broke 1</b>" in page  # over all test inputs
    assert page.count('class="ex-row fixed"') == 2 and page.count('class="ex-row broke"') == 1
    assert 'id="ex-fixed"' in page and "input.ex-fixed:checked" in page  # the filter, in CSS
    assert "rephrased question 0" in page  # System 2's intermediate text
    assert "70.0%" in page and "20.0%" in page and "System 2's behaviour was absorbed" in page
    assert 'aria-label="loss per training step"' in page
    assert page.count("<polyline") == 1 and page.count("<circle") >= 30  # one point per step
    assert 'aria-label="inputs by votes for the winning answer' in page
    assert page.count("<title>") >= 14 + 3  # a bar per histogram key, a segment per (system, step)
    assert 'aria-label="tokens per input by step"' in page and "generation, 8 samples" in page


def test_no_fidelity_gain_is_said_plainly(tmp_path):
    run = _run_dir(tmp_path)
    evals = json.loads(run.eval_json.read_text())
    evals["fidelity"] = _fidelity(0.3, 0.3, "not above chance")
    run.eval_json.write_text(json.dumps(evals))
    page = render(run)
    assert "No sign that System 2's behaviour was absorbed" in page and "chance baseline" in page


def test_the_report_is_self_contained(tmp_path):
    page = render(_run_dir(tmp_path))
    assert "<script" not in page.lower()
    external = [u for u in re.findall(r'(?:src|href)="([^"]+)"', page)]
    assert not external, external
    assert not re.findall(r"https?://(?!www\.w3\.org/2000/svg)", page)


def _boxes(svg: str) -> list[tuple[str, float, float, float, float]]:
    """Each text's box in an SVG, from its position, anchor and size (a generous average
    glyph width: 0.62 em)."""
    out = []
    for m in re.finditer(r'<text x="([\d.]+)" y="([\d.]+)" text-anchor="(\w+)" font-size="(\d+)"([^>]*)>([^<]*)</text>', svg):
        if "rotate" in m.group(5):
            continue  # the vertical axis title, alone in its margin
        x, y, size, text = float(m.group(1)), float(m.group(2)), int(m.group(4)), m.group(6)
        width = 0.62 * size * len(text)
        x0 = {"start": x, "middle": x - width / 2, "end": x - width}[m.group(3)]
        out.append((text, x0, y - size, x0 + width, y))
    return out


def test_no_label_overlaps_another_in_any_chart(tmp_path):
    for same_spot in (True, False):
        page = render(_run_dir(tmp_path / str(same_spot), same_spot))
        svgs = re.findall(r"<svg.*?</svg>", page, re.S)
        assert len(svgs) == 4  # scatter, tokens per step, vote histogram, loss
        for svg in svgs:
            boxes = _boxes(svg)
            for i, a in enumerate(boxes):
                for b in boxes[i + 1:]:
                    overlap = a[1] < b[3] and b[1] < a[3] and a[2] < b[4] and b[2] < a[4]
                    assert not overlap, (a, b)


def test_a_pipelines_report_shows_each_tasks_examples_each_with_its_own_filter(tmp_path):
    run = _run_dir(tmp_path)
    single = json.loads(run.eval_json.read_text())
    other = {**single, "examples": {"n": 16, "fixed": 0, "broke": 2, "rows": [_row(7, True, False), _row(8, True, False)]}}
    run.eval_json.write_text(json.dumps({"task": "pipeline", "split": "test", "tasks": {"trivia": single, "coin": other}}))
    page = render(run)
    examples = page.split("<h2>Examples</h2>")[1].split("<h2>")[0]
    assert examples.index("<h3>trivia</h3>") < examples.index("<h3>coin</h3>")
    assert "fixed 3</b>" in examples and "broke 2</b>" in examples  # each task's own counts
    assert examples.count('class="ex-row broke"') == 1 + 2
    for group in ("ex-0", "ex-1"):  # one radio group per task: choosing in one leaves the other alone
        assert examples.count(f'name="{group}"') == 3 and f'id="{group}-fixed"' in examples
    assert "No examples recorded" not in examples


def test_fidelity_and_examples_from_evaluation_rows():
    task = LastLetter(train=1, test=4)
    ids = ["a", "b", "c", "d"]
    base = pa.table({
        "id": ids, "input": ["q"] * 4, "answer": ["ab", "cd", "ef", "gh"],
        "system1_answers": [["ab"], ["xx"], ["ef"], [None]], "system1_outputs": [["o"]] * 4,
        "system2_answers": [["ab"], ["yy"], [None], ["zz"]], "system2_outputs": [["o"]] * 4,
        "system2_steps": [[json.dumps({"rephrase": "r"})]] * 4,
    })  # fmt: skip
    distilled = pa.table({"id": ids[::-1], "input": ["q"] * 4, "answer": ["gh", "ef", "cd", "ab"],
                          "distilled_answers": [["zz"], ["xx"], ["cd"], ["xx"]], "distilled_outputs": [["o"]] * 4})  # fmt: skip
    fid = fidelity(base, distilled)  # System 2 answered a, b, d; matched by id, not by row
    assert (fid["n"], fid["system1"], fid["distilled"]) == (3, pytest.approx(1 / 3), pytest.approx(1 / 3))
    assert fid["system1_chance"] == pytest.approx(1 / 9)  # "ab" 1 of 3 times, System 2 "ab" 1 of 3
    assert fid["constant_baseline"] == pytest.approx(1 / 3) and fid["verdict"] == "not above chance"
    assert "distilled" not in fidelity(base, None) and "verdict" not in fidelity(base, None)
    ex = examples(base, distilled, task, k=2)
    assert (ex["fixed"], ex["broke"], ex["n"]) == (1, 2, 4)  # b fixed; a and c broke
    assert {r["id"] for r in ex["rows"]} == {"b", "a"}  # fixed and broke first, in test order
    assert ex["rows"][0]["system2"]["steps"] == {"rephrase": "r"}


def _agreeing(s2: list[str], s1: list[str], d: list[str]) -> dict:
    ids = [f"t{i}" for i in range(len(s2))]
    wrap = lambda xs: [[x] for x in xs]  # noqa: E731
    base = pa.table({"id": ids, "system2_answers": wrap(s2), "system1_answers": wrap(s1)})
    return fidelity(base, pa.table({"id": ids, "distilled_answers": wrap(d)}))


def test_a_constant_answer_matching_system_2_is_not_called_absorbed():
    # System 2 says "ab" on 24 of 40 inputs; a distilled model that always says "ab"
    # agrees 60% of the time, as a constant does: not absorption.
    s2 = ["ab"] * 24 + [f"x{i}" for i in range(16)]
    fid = _agreeing(s2, [f"y{i}" for i in range(40)], ["ab"] * 40)
    assert fid["distilled"] == pytest.approx(0.6) and fid["distilled_baseline"] == pytest.approx(0.6)
    assert fid["verdict"] == "not above chance" and not fid["absorbed"]


def test_fidelity_far_above_chance_and_the_base_model_is_absorbed():
    s2 = [f"a{i % 10}" for i in range(40)]
    fid = _agreeing(s2, [f"y{i}" for i in range(40)], s2[:36] + ["zz"] * 4)
    assert fid["distilled"] == pytest.approx(0.9) and fid["distilled_p"] < 1e-6
    assert fid["distilled_vs_system1"]["p"] < 0.05 and fid["verdict"] == "absorbed"
    # The same agreement when the base model already had it: above chance, not absorbed.
    fid = _agreeing(s2, s2[:36] + ["y"] * 4, s2[:36] + ["zz"] * 4)
    assert fid["verdict"] == "no more than the base model"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0", "--window-size=1280,2400"]  # fmt: skip


def _open(page, tmp_path) -> tuple[list[str], float]:
    """(console messages, share of non-white pixels) of `page` shown in headless Chromium."""
    from PIL import Image

    shot = tmp_path / f"{page.stem}.png"
    proc = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shot.exists(), proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    image = Image.open(shot).convert("L")
    inked = sum(n for value, n in enumerate(image.histogram()) if value < 240) / (image.width * image.height)
    return console, inked


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_chromium_renders_the_report_without_console_errors(tmp_path):
    pytest.importorskip("PIL")
    run = _run_dir(tmp_path)
    write_report(run)
    console, inked = _open(run.report_html, tmp_path)
    assert console == []
    assert inked > 0.02  # not a blank page: text, tables and charts
    # The check itself can fail: a page with a script error and a blank page are caught.
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><body><script>undefinedFunction()</script></body>")
    console, inked = _open(bad, tmp_path)
    assert any("undefinedFunction" in line for line in console) and inked < 0.001


def test_a_diverged_training_still_gets_its_report(tmp_path):
    run = _run_dir(tmp_path)
    curve = [[1, 2.0, 40.0], [2, float("nan"), 40.0], [3, float("inf"), 40.0], [4, 1.0, 40.0]]
    run.update_run(stages={"train": {"steps": 4, "seconds": 5.0, "loss_curve": curve}})
    page = render(run)
    assert "not finite at step(s) 2, 3: training diverged" in page and "nan" not in page.lower().replace("nano", "")
