"""report.html: one self-contained page (inline SVG, no scripts, no network)."""

from __future__ import annotations

import html
import json

from s2d_ray.rundir import RunDir, atomic_write_text

COLORS = {"system1": "#1f77b4", "system2": "#d62728", "distilled": "#2ca02c"}
NAMES = {"system1": "System 1", "system2": "System 2", "distilled": "Distilled System 1"}


def _scatter(systems: dict[str, dict], metric: str) -> str:
    """The task's metric vs. mean generated tokens per input, one dot per system."""
    w, h, pad = 520, 320, 50
    max_tok = max([s["mean_generated_tokens"] for s in systems.values()] + [1.0]) * 1.15
    x = lambda t: pad + (w - 2 * pad) * t / max_tok  # noqa: E731
    y = lambda a: h - pad - (h - 2 * pad) * a  # noqa: E731
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
        'aria-label="metric versus mean generated tokens">',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#333"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#333"/>',
    ]
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<text x="{pad - 8}" y="{y(frac) + 4}" text-anchor="end" font-size="11">{frac:.0%}</text>')
        parts.append(f'<line x1="{pad}" y1="{y(frac)}" x2="{w - pad}" y2="{y(frac)}" stroke="#eee"/>')
    for i in range(5):
        t = max_tok * i / 4
        parts.append(f'<text x="{x(t)}" y="{h - pad + 16}" text-anchor="middle" font-size="11">{t:.0f}</text>')
    parts.append(f'<text x="{w / 2}" y="{h - 10}" text-anchor="middle" font-size="12">mean generated tokens per input</text>')
    parts.append(f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle" font-size="12">{html.escape(metric)}</text>')
    for name, s in systems.items():
        cx, cy = x(s["mean_generated_tokens"]), y(s.get(metric, 0.0))
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="7" fill="{COLORS[name]}"/>')
        parts.append(f'<text x="{cx + 10:.1f}" y="{cy - 8:.1f}" font-size="12">{NAMES[name]}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
        "mean generated tokens", "tokens per input by step", "unparsed", "n", "seconds",
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
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #ccc; padding: .35rem .7rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.verdict {{ font-size: 1.15rem; padding: .7rem 1rem; background: #f4f4f4; border-left: 4px solid #888; }}
.note {{ color: #7a4b00; background: #fff6e5; padding: .6rem 1rem; }}
</style></head><body>
<h1>{title}</h1>
<p>Model: <code>{html.escape(str(model.get('path') or model.get('name', '')))}</code>.
Evaluated on the <b>{html.escape(str(evals.get('split', '')))}</b> split.</p>
<p class="verdict">{html.escape(verdict)}</p>
{''.join(f'<p class="note">{n}</p>' for n in notes)}
<h2>Systems</h2>
{_table(headers, rows)}
{_scatter(systems, metric) if systems else ''}
<h2>Distillation set</h2>
{filt}
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


def write_report(run: RunDir) -> None:
    atomic_write_text(run.report_html, render(run))
