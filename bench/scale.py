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

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "local" / "last-letter-rar2.yaml"
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


def timed(cmd: list[str], log: Path, until=None) -> tuple[float, float, int]:
    """Run `cmd` in its own process group; (seconds, its own peak RSS in MiB, exit code).
    `until()` true: the whole group is killed (SIGKILL) there."""
    started = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        while until is not None and proc.poll() is None:
            if until():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
        _, status, usage = os.wait4(proc.pid, 0)
    if until is not None:  # Ray's own processes of that session, if any outlived the kill
        subprocess.run(["pkill", "-9", "-f", "ray::"], check=False)
    return time.perf_counter() - started, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


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
            result["raw_s"], _, rc = timed(cmd, log)
        else:
            out = work / f"run-{size}"
            actor = Peak("GeneratorActor")
            result["s2d_s"], result["driver_mib"], rc = timed(s2d(job, out), log)
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
    result["resume_s"], _, rc = timed(s2d(job, out), log)
    if rc != 0:
        fail(f"the rerun with nothing to do failed for {size} inputs (exit {rc})", log)
    killed = work / f"kill-{size}"
    timed(s2d(job, killed), log, until=lambda: rows_in(killed / "generate") >= size // 2)
    at_kill = rows_in(killed / "generate")
    result["finish_after_kill_s"], _, rc = timed(s2d(job, killed), log)
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
    result["resume_s"], result["driver_mib"], rc = timed(s2d(job, out), log)
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
    parser.add_argument("--raw-side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_side:
        return raw_side(json.loads(args.raw_side))
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
        first, last = results[0], results[-1]
        growth = last["overhead_us"] / first["overhead_us"] if first["overhead_us"] > 0 else float("nan")
        scanned = scans[-1] if scans else last
        resume = f"{scanned['resume_s']:.1f}" if "resume_s" in scanned else "not-measured"
        peak = max(r["driver_mib"] for r in results + scans)
        print(f"RESULT sizes={','.join(map(str, args.sizes))} ratio_largest={last['ratio']:.2f} "
              f"overhead_growth={growth:.2f} driver_peak_mib={peak:.0f} resume_scan_s={resume} "
              f"scan_inputs={scanned['inputs']}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
