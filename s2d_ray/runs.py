"""Many runs: one row per run directory under a folder, as a terminal table and as
`index.html` (every report linked, one metric-vs-tokens plot across runs)."""

from __future__ import annotations

import html
import json
from pathlib import Path

from s2d_ray.report import COLORS, NAMES, _axes, _table
from s2d_ray.rundir import atomic_write_text

SYSTEMS = ("system1", "system2", "distilled")


def find_runs(root: Path) -> list[Path]:
    """Every run directory (a folder with run.json) under `root`, up to three levels down;
    one reached through a symbolic link as well as directly is listed once."""
    found = sorted(p.parent for depth in range(1, 4) for p in root.glob("/".join(["*"] * depth) + "/run.json"))
    seen: dict[Path, Path] = {}
    for run in sorted(found, key=lambda r: (any(q.is_symlink() for q in [r, *r.parents]), str(r))):
        seen.setdefault(run.resolve(), run)
    return sorted(seen.values())


def summarize(run: Path, root: Path) -> dict:
    """What one run directory holds: its job, how far it got, and its figures."""
    row: dict = {"run": str(run.relative_to(root)), "path": run}
    try:
        info = json.loads((run / "run.json").read_text())
        evals = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    except (OSError, ValueError) as err:
        return {**row, "problem": f"unreadable: {type(err).__name__}"}
    cfg, stages, cost = info.get("config", {}), info.get("stages", {}), info.get("cost", {})
    gen = stages.get("generate", {})
    done = [s for s in ("generate", "train", "eval") if s in stages]
    row.update(
        task=cfg.get("task", {}).get("name", "?") if not cfg.get("tasks") else f"{len(cfg['tasks'])} tasks",
        method=cfg.get("method", {}).get("name", "?") if not cfg.get("tasks") else "per task",
        filter=cfg.get("filter", {}).get("name", "?") if not cfg.get("tasks") else "per task",
        model=cfg.get("model", {}).get("name", "?"),
        reached=done[-1] if done else "started",
        kept=f"{gen['kept']}/{gen['inputs']}" if "kept" in gen else "",
        metric=evals.get("metric", "accuracy"),
        systems={k: evals[k] for k in SYSTEMS if k in evals},
        verdict=evals.get("distillability", {}).get("verdict", ""),
        break_even=_break_even(evals.get("break_even")),
        tokens=cost.get("tokens"),
        cost=f"{cost.get('total', 0):.2f} {cost.get('currency', '')}".strip() if cost.get("device_hour_price") else "",
        report=(run / "report.html").exists(),
    )
    return row


def _break_even(be: dict | None) -> str:
    """The requests after which distillation paid, as `s2d runs` shows them."""
    if not be:
        return ""
    return f"{be['requests']:,} requests" if be.get("requests") else "never"


def _metric(row: dict, system: str) -> str:
    s = row.get("systems", {}).get(system)
    return "" if s is None or s.get(row["metric"]) is None else f"{100 * s[row['metric']]:.1f}%"


COLUMNS = ["#", "run", "task", "method", "filter", "model", "reached", "kept", "System 1", "System 2", "distilled",
           "verdict", "break-even", "tokens", "cost"]  # fmt: skip


def _cells(i: int, row: dict) -> list[str]:
    if "problem" in row:
        return [str(i), row["run"], row["problem"]] + [""] * (len(COLUMNS) - 3)
    tokens = f"{row['tokens']:,}" if row.get("tokens") else ""
    return [str(i), row["run"], row["task"], row["method"], row["filter"], row["model"], row["reached"], row["kept"],
            *(_metric(row, s) for s in SYSTEMS), row["verdict"], row["break_even"], tokens, row["cost"]]  # fmt: skip


def table_text(rows: list[dict]) -> str:
    cells = [COLUMNS] + [_cells(i, r) for i, r in enumerate(rows, 1)]
    widths = [max(len(c[j]) for c in cells) for j in range(len(COLUMNS))]
    return "\n".join("  ".join(c[j].ljust(widths[j]) for j in range(len(COLUMNS))).rstrip() for c in cells)


def _plot(rows: list[dict]) -> str:
    """Each run's systems: metric against mean generated tokens per input. Points carry
    the run's number (its row in the table) in a tooltip, never as overlapping labels."""
    points = [(i, name, s["mean_generated_tokens"], s.get(r["metric"]), r["run"])
              for i, r in enumerate(rows, 1) for name, s in r.get("systems", {}).items()
              if s.get(r["metric"]) is not None and "mean_generated_tokens" in s]  # fmt: skip
    if not points:
        return "<p>No evaluated run yet: nothing to plot.</p>"
    w, h, pad = 640, 360, 56
    top = max(p[2] for p in points) * 1.1 or 1.0
    x = lambda t: pad + (w - 2 * pad) * t / top  # noqa: E731
    y = lambda a: h - pad - (h - 2 * pad) * a  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
           'aria-label="metric versus mean generated tokens, every run">',
           *_axes((pad, pad, w - 2 * pad, h - 2 * pad), h, [(y(f), f"{f:.0%}") for f in (0, 0.25, 0.5, 0.75, 1.0)],
                  [(x(top * k / 4), f"{top * k / 4:.0f}") for k in range(5)], "mean generated tokens per input")]  # fmt: skip
    for i, name, tokens, value, run in points:
        out.append(f'<circle cx="{x(tokens):.1f}" cy="{y(value):.1f}" r="6" fill="{COLORS[name]}" fill-opacity="0.75">'
                   f"<title>#{i} {html.escape(run)}: {NAMES[name]} {100 * value:.1f}%, {tokens:.1f} tokens</title></circle>")  # fmt: skip
    legend = " ".join(f'<span style="color:{COLORS[n]}">&#9679;</span> {NAMES[n]}' for n in SYSTEMS)
    return "\n".join(out) + "</svg>\n<p>" + legend + " (hover a point for its run)</p>"


def index_html(rows: list[dict], root: Path) -> str:
    cells = []
    for i, r in enumerate(rows, 1):
        c = [html.escape(v) for v in _cells(i, r)]
        if r.get("report"):
            c[1] = f'<a href="{html.escape((Path(r["run"]) / "report.html").as_posix())}">{c[1]}</a>'
        cells.append(c)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>s2d runs</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}</style></head><body>"
        f"<h1>s2d runs in {html.escape(root.name or str(root))}</h1>"
        "<p>Metrics are each run's own task metric on its evaluation split.</p>"
        + _table(COLUMNS, cells) + "<h2>Metric against generated tokens, every run</h2>" + _plot(rows)
        + "</body></html>\n"
    )


def list_runs(root: Path) -> tuple[list[dict], Path]:
    """Rows of every run under `root`, and `root/index.html` written with them."""
    rows = [summarize(r, root) for r in find_runs(root)]
    index = root / "index.html"
    atomic_write_text(index, index_html(rows, root))
    return rows, index
