"""The `s2d` command."""

from __future__ import annotations

import sys

import click

from s2d_ray.errors import S2DError

JOB = click.argument("job", type=click.Path(dir_okay=False))
OUT = click.option("--out", "out", type=click.Path(file_okay=False), help="Run directory (default: the job's `out`).")
RETRY = click.option("--retry-failed", "retry_failed", is_flag=True,
                     help="Generate again the inputs recorded as failed (e.g. a prompt too long for the context).")
RESTART = click.option("--restart", is_flag=True, help="Start over: remove what this command's stages wrote before.")
VERBOSE = click.option(
    "--verbose", "-v", is_flag=True,
    help="Also show Ray, vLLM, DeepSpeed and transformers output live (it always goes to RUN/logs/).",
)
SET = click.option(
    "--set", "overrides", multiple=True, metavar="KEY.SUB=VALUE", help="Override a job setting; repeatable."
)


def _load(job: str, overrides: tuple[str, ...], out: str | None, runs_here: bool = True):
    """The job and its run directory; `runs_here`: this command runs it (its tracking must work)."""
    from s2d_ray.config import load_config
    from s2d_ray.rundir import RunDir

    cfg = load_config(job, overrides)
    if runs_here:
        from s2d_ray import tracking
        from s2d_ray.preflight import model_facts

        tracking.check(cfg)
        model_facts(cfg)  # the model folder, its context and chat template: before Ray starts
    return cfg, RunDir(out or cfg.out)


def _log(msg: str) -> None:
    click.echo(f"[s2d] {msg}", err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="s2d-ray")
def cli() -> None:
    """System 2 distillation on Ray: generate with a System 2 method, keep consistent
    answers, fine-tune the model to answer directly, and compare."""


@cli.command()
@JOB
@OUT
@SET
@RESTART
@RETRY
@VERBOSE
def run(job, out, overrides, restart, retry_failed, verbose):
    """Run every stage: generate, vote, train, evaluate, report."""
    from s2d_ray import pipeline
    from s2d_ray.console import terminal

    cfg, rd = _load(job, overrides, out)
    with rd.lock("run"), terminal(rd.logs, "run", verbose) as log:
        if restart:
            rd.restart(("generate", "train", "eval"), log)
        result = pipeline.run_all(cfg, rd, log, retry_failed)
    for label, r in result["tasks"].items():
        metric = r["metric"]
        parts = [f"{k} {100 * r[k][metric]:.1f}%" for k in ("system1", "system2", "distilled") if k in r]
        click.echo(f"done{' ' + label if cfg.tasks else ''}: {metric} {', '.join(parts)}; {r['verdict']}")
    click.echo(f"run directory: {rd.root}")
    click.echo(f"report: {rd.report_html}")


@cli.command()
@JOB
@OUT
@SET
@RESTART
@RETRY
@VERBOSE
def generate(job, out, overrides, restart, retry_failed, verbose):
    """System 2 generation and consistency vote: writes generate/ and distill/ (resumes)."""
    from s2d_ray import pipeline
    from s2d_ray.console import terminal

    cfg, rd = _load(job, overrides, out)
    with rd.lock("generate"), terminal(rd.logs, "generate", verbose) as log:
        if restart:
            rd.restart(("generate",), log)
        stats = (pipeline.generate_tasks if cfg.tasks else pipeline.generate)(cfg, rd, log, retry_failed)
    click.echo(f"kept {stats['kept']} of {stats['inputs']} inputs; run directory: {rd.root}")


@cli.command()
@JOB
@OUT
@SET
@RESTART
@VERBOSE
def train(job, out, overrides, restart, verbose):
    """Fine-tune on distill/ with DeepSpeed ZeRO-3: writes model/."""
    from s2d_ray import pipeline
    from s2d_ray.console import terminal

    cfg, rd = _load(job, overrides, out)
    with rd.lock("train"), terminal(rd.logs, "train", verbose) as log:
        if restart:
            rd.restart(("train",), log)
        pipeline.train(cfg, rd, log)
    click.echo(f"model: {rd.model}")


@cli.command(name="eval")
@JOB
@OUT
@SET
@RESTART
@VERBOSE
def eval_(job, out, overrides, restart, verbose):
    """Evaluate System 1, System 2 and the distilled model: writes eval.json and report.html."""
    from s2d_ray import pipeline
    from s2d_ray.console import terminal

    cfg, rd = _load(job, overrides, out)
    with rd.lock("eval"), terminal(rd.logs, "eval", verbose) as log:
        if restart:
            rd.restart(("eval",), log)
        result = pipeline.evaluate(cfg, rd, log)
        pipeline.report(rd, cfg, log)
    click.echo(result["distillability"]["text"])
    click.echo(f"report: {rd.report_html}")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False), metavar="RUN_DIR [RUN_DIR ...]")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option("--address", default=None, metavar="ADDR", help="Join this Ray cluster instead of starting a local Ray.")
@click.option("--route", "route_flags", multiple=True, metavar="NAME=MODE",
              help="Answer route NAME in this mode (distilled, system2 or system1) whatever its evaluation says.")
@click.option("--samples", type=click.IntRange(1, 64), default=None,
              help="System 2 samples per request (fewer than the job's filter.samples: lower latency).")
@click.option("--api-key-file", type=click.Path(dir_okay=False), default=None,
              help="Require this key (the file's first line) as Authorization: Bearer <key>; else $S2D_API_KEY.")
@click.option("--min-replicas", type=int, default=None, help="Engine replicas per model at least (serve.min_replicas).")
@click.option("--max-replicas", type=int, default=None, help="Engine replicas per model at most (serve.max_replicas).")
@click.option("--drain-s", type=float, default=None, help="Seconds a stop gives the requests in flight (serve.drain_s).")
@VERBOSE
def serve(run_dirs, host, port, address, route_flags, samples, api_key_file, min_replicas, max_replicas, drain_s, verbose):
    """Serve finished runs behind an OpenAI-compatible endpoint on Ray Serve: each run is a
    route named by its job, answering as its evaluation proved (distilled, System 2 or System 1)."""
    import os
    from pathlib import Path

    from s2d_ray.console import terminal
    from s2d_ray.serving.routes import load_routes, parse_route_flags

    routes = load_routes(list(run_dirs), parse_route_flags(route_flags))
    flags = {"min_replicas": min_replicas, "max_replicas": max_replicas, "drain_s": drain_s}
    for route in routes:  # the flags over each job's serve: section
        route.cfg = route.cfg.with_serve({k: v for k, v in flags.items() if v is not None})
    key = os.environ.get("S2D_API_KEY") or None
    if api_key_file:
        try:
            key = (Path(api_key_file).read_text(encoding="utf-8").splitlines() or [""])[0].strip()
        except (OSError, UnicodeDecodeError) as err:
            raise S2DError(f"--api-key-file {api_key_file}: cannot read it ({type(err).__name__})") from None
        if not key:
            raise S2DError(f"--api-key-file {api_key_file}: the file is empty")
    from s2d_ray.serving.server import serve_forever

    with terminal(Path(routes[0].run) / "logs", "serve", verbose) as log:
        serve_forever(routes, host, port, address, key, samples, log)


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def report(run_dir):
    """(Re)write report.html of a run directory."""
    from s2d_ray import pipeline
    from s2d_ray.rundir import RunDir

    rd = RunDir(run_dir)
    pipeline.report(rd)
    click.echo(f"report: {rd.report_html}")


@cli.command(name="runs")
@click.argument("folder", required=False, default="runs", type=click.Path(file_okay=False))
def runs_(folder):
    """A table of every run directory under FOLDER (default: runs/), and FOLDER/index.html
    linking every report, with one metric-vs-tokens plot across runs."""
    from pathlib import Path

    from s2d_ray.runs import list_runs, table_text

    root = Path(folder)
    if not root.is_dir():
        raise S2DError(f"{folder}: no such folder (s2d run makes run directories under runs/ by default)")
    rows, index = list_runs(root)
    click.echo(table_text(rows) if rows else f"no run directories under {folder}")
    click.echo(f"index: {index}")


@cli.command()
@JOB
@SET
@click.option("--gpu-hour-price", "price", type=float, default=None, help="Price of one device-hour (overrides cost.device_hour_price).")
def estimate(job, overrides, price):
    """Predict tokens, device-hours, money and memory of a job before running it."""
    from s2d_ray.estimate import estimate as predict
    from s2d_ray.estimate import render

    if price is not None:
        if price < 0:
            raise click.UsageError("--gpu-hour-price must be >= 0")
        overrides = (*overrides, f"cost.device_hour_price={price}")
    cfg, _ = _load(job, overrides, None, runs_here=False)
    click.echo(render(cfg, predict(cfg)))


@cli.command()
@JOB
@OUT
@SET
@click.option("--address", default=None, metavar="ADDR",
              help="A Ray cluster to check storage, memory and GPUs on (ray://HEAD:10001, HEAD:6379 or auto; default: "
                   "the job's ray.address, else $RAY_ADDRESS).")
def check(job, out, overrides, address):
    """Preflight: every check the job allows before any GPU is allocated (model folder,
    context, prompts and their BOS tokens, checkpoints; with a cluster: shared storage,
    free space, host memory and GPUs per node). Exit 1 when it finds a problem."""
    import os

    from s2d_ray.preflight import check_job

    cfg, rd = _load(job, overrides, out, runs_here=False)
    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    problems = check_job(cfg, rd.root, address, log=click.echo)
    if problems:
        click.echo(f"check: {len(problems)} problem(s) found", err=True)
        sys.exit(1)
    click.echo("check: no problem found")


ADDRESS = click.option(
    "--address", default=None, metavar="http://HEAD:8265", help="The cluster's Ray dashboard (default: $RAY_ADDRESS)."
)
INSECURE = click.option(
    "--insecure", is_flag=True, help="Allow sending the Ray token over plain http:// to a non-local address."
)


@cli.command()
@JOB
@ADDRESS
@SET
@click.option("--out", "out", default=None,
              help="Run directory on the cluster's shared storage: absolute, or relative to $S2D_RUNS / cluster.runs_dir.")
@INSECURE
@click.option("--no-wait", is_flag=True, help="Print the job id and return instead of streaming the logs.")
@click.option("--command", type=click.Choice(["run", "generate", "train", "eval"]), default="run", show_default=True)
def submit(job, address, overrides, out, insecure, no_wait, command):
    """Submit JOB.yaml to a Ray cluster (Ray Jobs) and stream its logs until it ends."""
    from pathlib import Path

    from s2d_ray.submit import follow
    from s2d_ray.submit import submit as send

    jc, job_id = send(Path(job), overrides, address, command, out, insecure)
    click.echo(f"submitted: {job_id}")
    if no_wait:
        click.echo(f"follow it with: s2d jobs logs {job_id}" + (f" --address {address}" if address else ""))
        return
    final = follow(jc, job_id, click.echo)
    click.echo(f"job {job_id}: {final}")
    if final != "SUCCEEDED":
        sys.exit(1)


@cli.group()
def jobs() -> None:
    """Follow or stop jobs submitted with `s2d submit`."""


@jobs.command()
@click.argument("job_id")
@ADDRESS
@INSECURE
def status(job_id, address, insecure):
    """Print a job's status."""
    from s2d_ray.submit import status as job_status

    click.echo(job_status(address, job_id, insecure))


@jobs.command()
@click.argument("job_id")
@ADDRESS
@INSECURE
def logs(job_id, address, insecure):
    """Print a job's logs so far."""
    from s2d_ray.submit import logs as job_logs

    click.echo(job_logs(address, job_id, insecure), nl=False)


@jobs.command()
@click.argument("job_id")
@ADDRESS
@INSECURE
def stop(job_id, address, insecure):
    """Stop a running job."""
    from s2d_ray.submit import stop as stop_job

    click.echo(f"{job_id}: {'stop requested' if stop_job(address, job_id, insecure) else 'not running'}")


@cli.group()
def models():
    """Embedded models (shipped in PyPI packages, converted locally, no download)."""


@models.command(name="list")
def models_list():
    """List embedded models and whether they are prepared."""
    from s2d_ray.models import EMBEDDED, embedded_path, is_complete

    for name, m in EMBEDDED.items():
        state = "ready" if is_complete(embedded_path(name)) else "not prepared"
        click.echo(f"{name}\t{state}\t{m.description}\t{embedded_path(name)}")


@models.command()
@click.argument("name")
@click.option("--force", is_flag=True, help="Convert again even if the folder is complete.")
def prepare(name, force):
    """Convert an embedded model once into a Hugging Face safetensors folder."""
    from s2d_ray.models import prepare as do_prepare

    click.echo(do_prepare(name, force=force, log=_log))


def main(argv: list[str] | None = None) -> None:
    """Entry point: every user error is one line on stderr and a non-zero exit."""
    try:
        cli.main(args=argv, prog_name="s2d", standalone_mode=False)
    except S2DError as err:
        click.echo(f"s2d: error: {err}", err=True)
        sys.exit(err.exit_code)
    except click.UsageError as err:
        if type(err).__name__.startswith("NoArgsIsHelp"):  # `s2d` or a group with no command
            click.echo(err.format_message())
            sys.exit(2)
        cmd = err.ctx.command_path if err.ctx else "s2d"
        click.echo(f"{cmd}: error: {err.format_message()} (see {cmd} --help)", err=True)
        sys.exit(2)
    except OSError as err:
        # Disk full, permission denied, read-only volume, file too large: what and where.
        # Files are written to temporary names and renamed: nothing earlier was damaged.
        where = f": {err.filename}" if err.filename else ""
        click.echo(f"s2d: error: {err.strerror or err}{where} (earlier results are untouched)", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("s2d: aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        click.echo(f"s2d: error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
