"""report.html: one self-contained page (inline SVG and CSS, no scripts, no network)."""

from __future__ import annotations

import html
import json
import math

from s2d_ray.rundir import RunDir, atomic_write_text

COLORS = {"system1": "#1f77b4", "system2": "#d62728", "distilled": "#2ca02c"}
NAMES = {"system1": "System 1", "system2": "System 2", "distilled": "Distilled System 1"}


def _svg(w: int, h: int, label: str, body: list[str]) -> str:
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
                      f'role="img" aria-label="{html.escape(label)}">', *body, "</svg>"])  # fmt: skip


def _text(x: float, y: float, text: str, anchor: str = "middle", size: int = 11, extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}"{extra}>{html.escape(text)}</text>'


def _nice_max(v: float) -> float:
    """A round axis maximum at or above `v`."""
    if not math.isfinite(v) or v <= 0:
        return 1.0
    mag = 10 ** math.floor(math.log10(v))
    return next(m * mag for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * mag >= v)


def _axes(box: tuple[float, float, float, float], h: float, yticks: list[tuple[float, str]],
          xticks: list[tuple[float, str]], xlabel: str, ylabel: str | None = None) -> list[str]:
    """A chart's frame: axes of the plot area `box` (left, top, width, height), grid lines
    and labels at the given pixel positions, the axis titles."""
    left, top, plot_w, plot_h = box
    base = top + plot_h
    out = [f'<line x1="{left}" y1="{base}" x2="{left + plot_w}" y2="{base}" stroke="#333"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="#333"/>']  # fmt: skip
    for py, label in yticks:
        out.append(f'<line x1="{left}" y1="{py:.1f}" x2="{left + plot_w}" y2="{py:.1f}" stroke="#eee"/>')
        out.append(_text(left - 6, py + 4, label, "end"))
    out += [_text(px, base + 16, label) for px, label in xticks]
    out.append(_text(left + plot_w / 2, h - 8, xlabel, size=12))
    if ylabel:
        out.append(_text(14, top + plot_h / 2, ylabel, size=12, extra=f' transform="rotate(-90 14 {top + plot_h / 2})"'))
    return out


MARKERS = {  # distinct shapes and sizes: two systems on the same spot both stay visible
    "system1": lambda x, y, c: f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{c}"/>',
    "system2": lambda x, y, c: f'<rect x="{x - 6:.1f}" y="{y - 6:.1f}" width="12" height="12" fill="{c}"/>',
    "distilled": lambda x, y, c: f'<circle cx="{x:.1f}" cy="{y:.1f}" r="10" fill="none" stroke="{c}" stroke-width="3"/>',
}


def _scatter(systems: dict[str, dict], metric: str) -> str:
    """The task's metric vs. mean generated tokens per input, one marker per system; names
    in a legend beside the plot, never on it, so they cannot overlap."""
    w, h, left, top, plot_w, plot_h = 640, 300, 56, 16, 380, 230
    max_tok = _nice_max(max([s["mean_generated_tokens"] for s in systems.values()] + [1.0]) * 1.1)
    x = lambda t: left + plot_w * t / max_tok  # noqa: E731
    y = lambda a: top + plot_h * (1 - a)  # noqa: E731
    body = _axes((left, top, plot_w, plot_h), h, [(y(f), f"{f:.0%}") for f in (0, 0.25, 0.5, 0.75, 1.0)],
                 [(x(max_tok * i / 4), f"{max_tok * i / 4:.3g}") for i in range(5)], "mean generated tokens per input",
                 metric)  # fmt: skip
    for n, (name, s) in enumerate(systems.items()):
        body.append(MARKERS[name](x(s["mean_generated_tokens"]), y(s.get(metric, 0.0)), COLORS[name]))
        ly = top + 14 + 40 * n  # the legend: one row per system
        body.append(MARKERS[name](left + plot_w + 34, ly, COLORS[name]))
        body.append(_text(left + plot_w + 52, ly + 4, NAMES[name], "start", 12))
        body.append(_text(left + plot_w + 52, ly + 19, f"{100 * s.get(metric, 0.0):.1f}%, {s['mean_generated_tokens']:.1f} tokens",
                          "start", 11, ' fill="#555"'))  # fmt: skip
    return _svg(w, h, f"{metric} versus mean generated tokens", body)


def _line(points: list[tuple[float, float]], xlabel: str, ylabel: str) -> str:
    """A line chart (training loss per step)."""
    w, h, left, top, plot_w, plot_h = 640, 260, 64, 14, 550, 200
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    ymax = _nice_max(max(ys))
    x = lambda v: left + plot_w * (v - x0) / (x1 - x0)  # noqa: E731
    y = lambda v: top + plot_h * (1 - v / ymax)  # noqa: E731
    ticks = sorted({round(x0 + (x1 - x0) * i / 5) for i in range(6)})
    body = _axes((left, top, plot_w, plot_h), h, [(y(ymax * i / 4), f"{ymax * i / 4:.3g}") for i in range(5)],
                 [(x(t), f"{t:g}") for t in ticks], xlabel, ylabel)  # fmt: skip
    path = " ".join(f"{x(a):.1f},{y(b):.1f}" for a, b in points)
    body.append(f'<polyline points="{path}" fill="none" stroke="#2ca02c" stroke-width="2"/>')
    body += [f'<circle cx="{x(a):.1f}" cy="{y(b):.1f}" r="3" fill="#2ca02c"/>' for a, b in points]
    return _svg(w, h, f"{ylabel} per {xlabel}", body)


def _columns(bars: list[tuple[str, float]], xlabel: str, ylabel: str) -> str:
    """Vertical bars (the vote-agreement histogram); with many bars, every k-th labelled."""
    w, h, left, top, plot_w, plot_h = 640, 250, 56, 14, 560, 190
    ymax = _nice_max(max([v for _, v in bars] + [1]))
    slot = plot_w / max(len(bars), 1)
    every = max(1, math.ceil(len(bars) * 40 / plot_w))  # labels at least 40 px apart
    y = lambda v: top + plot_h * (1 - v / ymax)  # noqa: E731
    labels = [(left + slot * (n + 0.5), name) for n, (name, _) in enumerate(bars) if n % every == 0]
    body = _axes((left, top, plot_w, plot_h), h, [(y(ymax * i / 4), f"{ymax * i / 4:g}") for i in range(5)], labels,
                 xlabel, ylabel)  # fmt: skip
    for n, (name, v) in enumerate(bars):
        bx = left + slot * n + slot * 0.15
        body.append(f'<rect x="{bx:.1f}" y="{y(v):.1f}" width="{slot * 0.7:.1f}" height="{top + plot_h - y(v):.1f}" fill="#6b8fb5">'
                    f"<title>{html.escape(name)}: {v:g}</title></rect>")  # fmt: skip
    return _svg(w, h, f"{ylabel} by {xlabel}", body)


STEP_COLORS = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f"]


def _stacked(rows: list[tuple[str, dict[str, float]]], unit: str) -> str:
    """Horizontal stacked bars, one row per system, one segment per step; names in a left
    column and steps in a legend row above, so no label sits on another."""
    steps = list(dict.fromkeys(k for _, parts in rows for k in parts))
    color = {s: STEP_COLORS[i % len(STEP_COLORS)] for i, s in enumerate(steps)}
    w, left, top, bar_w, row_h = 640, 190, 34, 330, 30
    h = top + row_h * len(rows) + 10
    vmax = _nice_max(max([sum(p.values()) for _, p in rows] + [1.0]))
    body, lx = [], left
    for s in steps:  # the legend row
        body.append(f'<rect x="{lx}" y="6" width="12" height="12" fill="{color[s]}"/>')
        body.append(_text(lx + 16, 16, s, "start"))
        lx += 30 + 7 * len(s)
    for n, (name, parts) in enumerate(rows):
        ry, x = top + row_h * n, left
        body.append(_text(left - 8, ry + 15, name, "end", 12))
        for s, v in parts.items():
            width = bar_w * v / vmax
            body.append(f'<rect x="{x:.1f}" y="{ry:.1f}" width="{width:.1f}" height="20" fill="{color[s]}">'
                        f"<title>{html.escape(f'{name}, {s}: {v:.1f} {unit}')}</title></rect>")  # fmt: skip
            x += width
        body.append(_text(x + 6, ry + 15, f"{sum(parts.values()):.1f}", "start"))
    return _svg(w, h, f"{unit} by step", body)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _answer(system: dict | None) -> str:
    if system is None:
        return ""
    mark = '<span class="ok">✓</span>' if system["correct"] else '<span class="bad">✗</span>'
    shown = html.escape(str(system["answer"])) if system["answer"] is not None else "<i>no answer</i>"
    return f'{mark} <b>{shown}</b><div class="out">{html.escape(system.get("output") or "")}</div>'


def _examples(ex: dict | None, key: str = "ex") -> str:
    """Test inputs side by side; radio buttons and CSS filter them (no script). `key`
    names the radio group (a pipeline's report has one per task)."""
    if not ex or not ex.get("rows"):
        return "<p>No examples recorded (evaluate to see some).</p>"
    rows = []
    for r in ex["rows"]:
        s2 = r.get("system2")
        reasoning = ""
        if s2 and s2.get("steps"):
            steps = "".join(f"<p><b>{html.escape(k)}</b>: {html.escape(v or '')}</p>" for k, v in s2["steps"].items())
            reasoning = f"<details><summary>reasoning</summary>{steps}</details>"
        rows.append(
            f'<tr class="ex-row {r.get("change", "")}"><td class="in">{html.escape(r["input"])}</td>'
            f'<td>{html.escape(str(r["gold"]))}</td><td>{reasoning}{_answer(s2)}</td>'
            f'<td>{_answer(r.get("system1"))}</td><td>{_answer(r.get("distilled"))}</td></tr>'
        )
    shown = len(ex["rows"])
    fixed = sum(r.get("change") == "fixed" for r in ex["rows"])
    broke = sum(r.get("change") == "broke" for r in ex["rows"])
    return f"""<p>Of all {ex['n']} test inputs, distillation <b>fixed {ex['fixed']}</b> (System 1 wrong, distilled right)
and <b>broke {ex['broke']}</b> (System 1 right, distilled wrong). {shown} of them here, those first.</p>
<div class="examples">
<input type="radio" class="ex-all" name="{key}" id="{key}-all" checked><label for="{key}-all">all shown ({shown})</label>
<input type="radio" class="ex-fixed" name="{key}" id="{key}-fixed"><label for="{key}-fixed">distillation fixed it ({fixed})</label>
<input type="radio" class="ex-broke" name="{key}" id="{key}-broke"><label for="{key}-broke">distillation broke it ({broke})</label>
<table class="ex"><thead><tr><th>input</th><th>gold</th><th>System 2 (reasoning, answer)</th><th>System 1</th>
<th>Distilled System 1</th></tr></thead><tbody>{"".join(rows)}</tbody></table>
</div>"""


def _task_examples(evals: dict) -> str:
    """A pipeline's examples, task by task."""
    tasks = evals.get("tasks", {})
    if not tasks:
        return "<p>No examples recorded (evaluate to see some).</p>"
    return "".join(f"<h3>{html.escape(label)}</h3>" + _examples(t.get("examples"), key=f"ex-{i}")
                   for i, (label, t) in enumerate(tasks.items()))  # fmt: skip


def _fidelity(fid: dict | None) -> str:
    if not fid:
        return "<p>Fidelity needs System 2's answers on the test split (<code>eval.system2</code>).</p>"
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    if "constant_baseline" not in fid:  # evaluated before chance baselines were recorded
        return ("<p>This run's evaluation predates chance baselines for fidelity: run <code>s2d eval</code> again.</p>"
                + _table(["system", "same answer as System 2"], [[NAMES[k], pct(fid[k])] for k in ("system1", "distilled") if k in fid]))  # fmt: skip
    cells = [[NAMES[k], pct(fid[k]), pct(fid[f"{k}_baseline"]), f"{fid[f'{k}_p']:.2g}"]
             for k in ("system1", "distilled") if k in fid]  # fmt: skip
    out = (f"<p>On the {fid['n']} test inputs where System 2 gave a well-formed answer: the share where each system "
           f"gives the same answer, right or wrong (no labels needed), beside its chance baseline: the larger of the "
           f"agreement its own answer distribution would reach by chance and that of the best constant answer "
           f"(<q>{html.escape(str(fid['constant_answer']))}</q>, {pct(fid['constant_baseline'])} of System 2's answers); "
           f"p: {html.escape(fid['test'])}.</p>"
           + _table(["system", "same answer as System 2", "chance baseline", "p (above the baseline)"], cells))  # fmt: skip
    if "verdict" in fid:
        vs = fid["distilled_vs_system1"]
        text = {
            "absorbed": "System 2's behaviour was absorbed: the distilled model agrees with System 2 significantly "
                        "more than chance and than the base model's System 1 does",
            "no more than the base model": "The distilled model agrees with System 2 above chance, but not "
                                           "significantly more than the base model's System 1 already did",
            "not above chance": "No sign that System 2's behaviour was absorbed: the distilled model's agreement "
                                "with System 2 is not significantly above what chance or a constant answer gives",
        }[fid["verdict"]]  # fmt: skip
        out += f"<p>{text} (against System 1's agreement: McNemar p={vs['p']:.2g}).</p>"
    return out


def _paired(tests: dict | None) -> str:
    rows = [[html.escape(k.replace("_vs_", " vs ").replace("system", "System ")), f"{100 * t['a']:.1f}%",
             f"{100 * t['b']:.1f}%", str(t["only_a"]), str(t["only_b"]), f"{t['p']:.2g}", str(t["n"])]
            for k, t in (tests or {}).items() if "_vs_" in k]  # fmt: skip
    if not rows:
        return ""
    return (f"<p>Each comparison on the same inputs: {html.escape(tests['test'])}, significant below p={tests['alpha']}. "
            "Only the inputs where the two disagree count.</p>"
            + _table(["comparison", "first", "second", "only the first right", "only the second right", "p", "n"], rows))


def _tasks(evals: dict, gen: dict) -> str:
    """A pipeline's tasks side by side: each task's systems, verdict, fidelity and set."""
    rows = []
    for label, t in evals.get("tasks", {}).items():
        metric = t.get("metric", "accuracy")
        cell = lambda k: f"{100 * t[k][metric]:.1f}% / {t[k]['mean_generated_tokens']:.1f} tok" if k in t else ""  # noqa: E731
        fid = t.get("fidelity") or {}
        fidelity = (f"{100 * fid['distilled']:.0f}% (chance {100 * fid['distilled_baseline']:.0f}%): {fid['verdict']}"
                    if "verdict" in fid else "")  # fmt: skip
        kept = gen.get("tasks", {}).get(label, {})
        div = kept.get("diversity") or {}
        kept_text = f"{kept.get('kept', '')}/{kept.get('inputs', '')}" + (" (dominated)" if div.get("dominated") else "")
        rows.append([html.escape(label), html.escape(f"{t['task']}, {t['method']}"), kept_text, cell("system1"),
                     cell("system2"), cell("distilled"), html.escape(t["distillability"]["text"]), html.escape(fidelity)])
    return ("<p>One model distilled on every task below; each task evaluated on its own test inputs, each comparison "
            "paired on those inputs (McNemar's exact test).</p>"
            + _table(["task", "what", "kept", "System 1", "System 2", "distilled", "verdict", "fidelity (chance)"], rows))


def _no_harm(entries: dict | None) -> str:
    if not entries:
        return ("<p>No no-harm tasks were evaluated (<code>eval.no_harm</code>): nothing says what distillation "
                "cost on tasks it was not distilled on.</p>")
    rows = []
    for label, e in entries.items():
        metric = e.get("metric", "accuracy")
        for k, base in e["base"].items():
            d = e.get("distilled", {}).get(k)
            t = e.get("tests", {}).get(k)
            rows.append([html.escape(label), "System 1" if k == "system1" else f"System 2 ({html.escape(str(e['method']))})",
                         f"{100 * base[metric]:.1f}%", f"{100 * d[metric]:.1f}%" if d else "",
                         f"{t['p']:.2g}" if t else "", str(base["n"])])  # fmt: skip
    texts = "".join(f"<p><b>{html.escape(label)}</b>: {html.escape(e['text'])}.</p>" for label, e in entries.items())
    return ("<p>Tasks the model was not distilled on, scored on the base and the distilled model; each pair on the "
            "same inputs (McNemar's exact test).</p>"
            + _table(["task", "system", "base model", "distilled model", "p", "n"], rows) + texts)


def _break_even(be: dict | None) -> str:
    if not be:
        return "<p>The break-even needs System 2 and the distilled model evaluated.</p>"
    cur = html.escape(be.get("currency", ""))
    rows = [[NAMES[k], f"{be['tokens_per_answer'][k]:.1f}", f"{be['device_seconds_per_answer'][k]:.3f}",
             f"{be['cost_per_1000'][k]:.4f} {cur}"] for k in be["device_seconds_per_answer"]]  # fmt: skip
    return (f"<p>{html.escape(be['text'])} Distillation: generation and training, "
            f"{be['distillation_device_hours']:.4f} device-hours ({be['distillation_cost']:.4f} {cur}). "
            "Per answer, as measured by this run's evaluation (one engine's devices):</p>"
            + _table(["system", "generated tokens", "device-seconds", "cost per 1,000 answers"], rows))


def render(run: RunDir) -> str:
    info = run.read_run()
    evals = json.loads(run.eval_json.read_text()) if run.eval_json.exists() else {}
    systems = {k: evals[k] for k in ("system1", "system2", "distilled") if k in evals}
    cfg = info.get("config", {})
    cost = info.get("cost", {})
    stages = info.get("stages", {})
    currency = cost.get("currency", "")
    model = cfg.get("model", {})
    embedded = not model.get("path")

    metric = evals.get("metric", "accuracy")
    extras = sorted(
        {k for s in systems.values() for k in s if k.startswith((f"{metric}_", "inconsistent")) and not k.endswith("_stderr")}
    )
    pct = lambda v: "" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    rows = [
        [
            NAMES[name],
            f"{pct(s.get(metric))} ± {100 * s.get(f'{metric}_stderr', 0):.1f}",
            *[pct(s.get(k)) for k in extras],
            f"{s['mean_generated_tokens']:.1f}",
            html.escape(", ".join(f"{k} {v:.1f}" for k, v in s.get("tokens_per_step", {}).items())),
            str(s.get("parse_failures", "")),
            str(s["n"]),
            f"{s['seconds']:.1f}",
        ]
        for name, s in systems.items()
    ]
    headers = [
        "system", metric, *[k.replace("_", " ") for k in extras],
        "mean generated tokens", "tokens per input by step", "no well-formed answer", "n", "seconds",
    ]  # fmt: skip
    stage_rows = [
        [
            html.escape(name),
            f"{st.get('seconds', 0):.1f}",
            f"{st.get('tokens', 0):,}",
            f"{st.get('device_hours', 0):.4f}",
            f"{st.get('cost', 0):.4f} {html.escape(currency)}",
        ]
        for name, st in stages.items()
    ]
    gen = stages.get("generate", {})
    predicted = info.get("estimate", {}).get("stages", {})
    est_rows = [
        [
            html.escape(name),
            f"{p.get('tokens', 0):,.0f}",
            f"{stages.get(name, {}).get('tokens') or 0:,}" if name in stages else "not run",
            f"{p.get('device_hours', 0):.4f}",
            f"{stages[name].get('device_hours', 0):.4f}" if name in stages else "",
            f"{p.get('cost', 0):.2f} / " + (f"{stages[name].get('cost', 0):.2f}" if name in stages else "-"),
        ]
        for name, p in predicted.items()
    ]
    verdict = evals.get("distillability", {}).get("text", "Not evaluated yet.")
    single = f"""<h2>Systems</h2>
{_table(headers, rows)}
{_scatter(systems, metric) if systems else ''}
{_paired(evals.get("paired"))}
<h2>Did the distilled model take on System 2's behaviour?</h2>
{_fidelity(evals.get("fidelity"))}"""
    notes = []
    if embedded:
        notes.append(
            f"This run uses the embedded model ({html.escape(model.get('name', ''))}, 135M parameters): "
            "a smoke-scale model that proves the machinery end to end. It is far too small to show the "
            "paper's effect; run a <code>jobs/</code> config on a real model for that."
        )
    task = cfg.get("task", {})
    title = f"s2d-ray: {html.escape(str(task.get('name', '')))} with {html.escape(cfg.get('method', {}).get('name', ''))}"
    filt = ""
    if gen:
        f = cfg.get("filter", {})
        hist = ", ".join(f"{k}: {v}" for k, v in sorted(gen.get("agreement_histogram", {}).items()))
        drops = ", ".join(f"{k}: {v}" for k, v in sorted(gen.get("drop_reasons", {}).items())) or "none"
        filt = (
            f"<p>Filter <b>{html.escape(f.get('name', ''))}</b> kept <b>{gen.get('kept', 0)}</b> of "
            f"{gen.get('inputs', 0)} inputs (N={f.get('samples', '')}). Votes for the winning answer: "
            f"{html.escape(hist)}. Dropped: {html.escape(drops)}.</p>"
        )
        uncounted = gen.get("samples_not_counted")
        if uncounted:
            top = "; ".join(f"{k} x{v}" for k, v in gen.get("malformed_top", {}).items())
            filt += (f"<p>Samples whose answer was not voted on: {uncounted['no answer']:,} with no answer, "
                     f"{uncounted['malformed']:,} malformed for their input" + (f" ({html.escape(top)})" if top else "")
                     + ". Only well-formed answers are voted on and distilled.</p>")  # fmt: skip
        div = gen.get("diversity")
        if div:
            line = (f"Answer diversity: {div['distinct']} distinct targets; the most common, "
                    f"<q>{html.escape(div['top_target'])}</q>, is {100 * div['top_share']:.0f}% of the set.")
            filt += (f'<p class="note">{line} A set dominated by one answer (over {100 * div["dominated_above"]:.0f}%) '
                     "teaches a constant, not System 2.</p>" if div["dominated"] else f"<p>{line}</p>")  # fmt: skip
        if gen.get("samples_budget"):
            filt += (
                f"<p>Samples drawn: {gen.get('samples_drawn', 0):,} of {gen['samples_budget']:,} "
                f"({100 * gen.get('samples_drawn', 0) / gen['samples_budget']:.0f}%"
                + (", adaptive voting" if f.get("adaptive") else "") + ").</p>"
            )
        if gen.get("failed"):
            why = ", ".join(f"{k}: {v}" for k, v in sorted(gen.get("failure_reasons", {}).items()))
            filt += f'<p class="note">{gen["failed"]} input(s) failed and were left out ({html.escape(why)}).</p>'
        if gen.get("engine_restarts"):
            filt += f'<p class="note">Engines were restarted {gen["engine_restarts"]} time(s); their batches were redone.</p>'
        if gen.get("budget_stop"):
            filt += f'<p class="note">Generation stopped early: {html.escape(gen["budget_stop"])}.</p>'
        if gen.get("usc_selection"):
            how = ", ".join(f"{k}: {v}" for k, v in sorted(gen["usc_selection"].items()))
            filt += f"<p>USC choices by how they were made: {html.escape(how)}.</p>"
        if gen.get("tokens_per_input_per_step"):
            steps = ", ".join(f"{k} {v:.1f}" for k, v in gen["tokens_per_input_per_step"].items())
            filt += (
                f"<p>Generation tokens per input: {gen.get('tokens_per_input', 0):.1f} "
                f"(by step, all samples: {html.escape(steps)}).</p>"
            )
    token_rows = [(NAMES[k], s.get("tokens_per_step") or {"answer": s["mean_generated_tokens"]}) for k, s in systems.items()]
    if gen.get("tokens_per_input_per_step"):
        token_rows.append((f"generation, {cfg.get('filter', {}).get('samples', '')} samples", gen["tokens_per_input_per_step"]))
    tokens_chart = _stacked(token_rows, "tokens per input") if token_rows else ""
    hist = sorted((gen.get("agreement_histogram") or {}).items(), key=lambda kv: _fraction(kv[0]))
    hist_chart = _columns(hist, "votes for the winning answer (of samples drawn)", "inputs") if hist else ""
    curve = stages.get("train", {}).get("loss_curve") or []
    finite = [(c[0], c[1]) for c in curve if c[1] is not None and math.isfinite(c[1])]
    loss_chart = (_line(finite, "training step", "loss") if len(finite) > 1 else
                  "<p>No loss curve recorded (one step, or trained before s2d recorded it).</p>")  # fmt: skip
    if len(finite) < len(curve):
        bad = [str(c[0]) for c in curve if c[1] is None or not math.isfinite(c[1])]
        loss_chart += f'<p class="note">The loss was not finite at step(s) {html.escape(", ".join(bad[:20]))}: training diverged.</p>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: .35rem .7rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.verdict {{ font-size: 1.15rem; padding: .7rem 1rem; background: #f4f4f4; border-left: 4px solid #888; }}
.note {{ color: #7a4b00; background: #fff6e5; padding: .6rem 1rem; }}
svg {{ display: block; margin: .5rem 0 1rem; max-width: 100%; height: auto; }}
.examples > input {{ margin-left: 1rem; }}
table.ex th {{ text-align: left; }}
table.ex td {{ text-align: left; vertical-align: top; font-size: .9rem; max-width: 16rem; overflow-wrap: anywhere; }}
table.ex .out {{ color: #555; font-size: .8rem; white-space: pre-wrap; max-height: 8rem; overflow: auto; }}
.ok {{ color: #2ca02c; }} .bad {{ color: #d62728; }}
.examples input.ex-fixed:checked ~ table tr.ex-row:not(.fixed), .examples input.ex-broke:checked ~ table tr.ex-row:not(.broke) {{ display: none; }}
</style></head><body>
<h1>{title}</h1>
<p>Model: <code>{html.escape(str(model.get('path') or model.get('name', '')))}</code>.
Evaluated on the <b>{html.escape(str(evals.get('split', '')))}</b> split.</p>
<p class="verdict">{html.escape(verdict)}</p>
{''.join(f'<p class="note">{n}</p>' for n in notes)}
{single if evals.get("task") != "pipeline" else "<h2>Tasks</h2>" + _tasks(evals, gen)}
<h2>When does distillation pay?</h2>
{_break_even(evals.get("break_even"))}
<h2>No harm elsewhere?</h2>
{_no_harm(evals.get("no_harm"))}
<h2>Tokens per input, by step</h2>
{tokens_chart}
<h2>Examples</h2>
{_examples(evals.get("examples")) if evals.get("task") != "pipeline" else _task_examples(evals)}
<h2>Distillation set</h2>
{filt}
{hist_chart}
<h2>Training</h2>
{loss_chart}
<h2>Stages: time, tokens, cost</h2>
{_table(["stage", "wall seconds", "tokens", "device-hours", "cost"], stage_rows)}
<h2>Estimate beside measurement</h2>
{_table(["stage", "tokens (estimated)", "tokens (measured)", "device-hours (estimated)", "device-hours (measured)", f"cost estimated / measured ({html.escape(currency)})"], est_rows) if est_rows else "<p>No estimate recorded.</p>"}
<p>The estimate (<code>s2d estimate</code>) is made from the job's sizes and the throughput assumptions in
<code>run.json</code>; measured training tokens count the non-padding tokens the trainer saw.</p>
<p>Price per device-hour: {cost.get('device_hour_price', 0)} {html.escape(currency)}.
Device-hours count every device a stage held (engines at the pool's maximum size, trainer workers) for its wall time.</p>
</body></html>
"""


def _fraction(key: str) -> float:
    """'2/3' -> 0.667 (histogram keys sort by agreement, adaptive runs mixing sample counts)."""
    a, _, b = key.partition("/")
    try:
        return float(a) / float(b)
    except (ValueError, ZeroDivisionError):
        return 0.0


def write_report(run: RunDir) -> None:
    atomic_write_text(run.report_html, render(run))
