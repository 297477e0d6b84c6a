"""The training input path at scale: can it starve a GPU?

A distillation set of N rows (default 100,000: last-letter prompts with their answers as
targets, written as s2d writes distill/) goes through what a training does before and
while its ranks step:
  tokenize  the driver reads distill/, sorts it by id and tokenizes it with the embedded
            model's tokenizer (`tokenized_distill_set`, what `train` calls);
  ranks     the tokenized set in Ray's object store as `train` puts it there, and WORLD
            Ray tasks (ranks) each reading the whole set through its own iterator,
            taking its own rows, bucketing them by length into micro-batches and padding
            them into tensors (`micro_batches` and `collate`, what every rank runs), all
            at once, timed from the first rank's start to the last rank's end.
Against: the rows per second the 70B paper jobs' training steps consume, from `s2d
estimate` (its tokens per second per GPU, the job's workers, sequence length and output
share). Goal: each stage at least 10x the fastest paper job's consumption.

Ends with  RESULT rows=... tokenize_rows_s=... ranks_rows_s=... paper_rows_s=... headroom=...
(headroom: the slower stage's rows/s over the paper jobs' highest).

    python bench/train_input.py [--rows 100000] [--world 2] [--repeat 1]   # --repeat 16: rows of ~700 tokens
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

JOB = ROOT / "jobs" / "local" / "last-letter-rar2.yaml"


def rank_reads(ds, rank: int, world: int, train_cfg) -> tuple[int, float, float]:
    """One rank's input, as the trainer loop consumes it: (rows, seconds, its start time)."""
    from s2d_ray.training.data import collate, micro_batches

    started = time.time()
    rows = 0
    for batch in micro_batches(ds.iterator(), train_cfg, cycle=False, rank=rank, world=world):
        collate(batch, pad_id=0)
        rows += len(batch)
    return rows, time.time() - started, started


def paper_consumption() -> list[tuple[str, float]]:
    """Rows per second each 70B paper job's training steps consume, by its estimate."""
    from s2d_ray.config import load_config
    from s2d_ray.estimate import estimate

    out = []
    for job in sorted((ROOT / "jobs" / "paper").glob("*-70b.yaml")):
        cfg = load_config(job)
        t, train = cfg.train, estimate(cfg)["stages"].get("train")
        if not train:
            continue
        rows = train["steps"] * t.micro_batch_size * t.grad_accum * t.workers
        seconds = (train["device_hours"] - train["checkpoints"]["device_hours"]) / t.workers * 3600
        out.append((job.stem, rows / seconds))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="each prompt written this many times over (longer rows)")
    args = parser.parse_args()

    import pyarrow as pa
    import ray

    from s2d_ray.config import load_config
    from s2d_ray.models import prepare
    from s2d_ray.rundir import write_part
    from s2d_ray.training.data import tokenized_distill_set
    from s2d_ray.training.driver import ROWS_PER_BLOCK

    cfg = load_config(JOB, [f"task.train={args.rows}", "task.test=0", "train.max_seq_len=4096"])
    model = prepare(cfg.model.name, log=lambda *a: None)
    work = Path(tempfile.mkdtemp(prefix="s2d-train-input-"))
    try:
        examples = cfg.task.examples("train")
        distill = work / "distill"
        for at in range(0, len(examples), 20_000):  # parts of a size a finished stage leaves
            chunk = examples[at : at + 20_000]
            write_part(distill, pa.table({"id": [e.id for e in chunk], "prompt": [" ".join([e.question] * args.repeat) for e in chunk],
                                          "target": [f"Answer: {e.answer}" for e in chunk]}))  # fmt: skip
        print(f"{len(examples):,} distillation rows (last-letter prompts, embedded tokenizer), {args.world} ranks", flush=True)

        started = time.perf_counter()
        rows_df, n = tokenized_distill_set(distill, model, cfg.train)
        tokenize_s = time.perf_counter() - started
        lengths = rows_df["input_ids"].map(len)
        print(f"tokenize (driver, one process): {n:,} rows in {tokenize_s:.1f} s = {n / tokenize_s:,.0f} rows/s "
              f"(mean {lengths.mean():.0f} tokens, max {lengths.max()})", flush=True)  # fmt: skip

        ray.init(num_cpus=args.world, include_dashboard=False, log_to_driver=False)
        ds = ray.data.from_pandas([rows_df.iloc[i : i + ROWS_PER_BLOCK] for i in range(0, len(rows_df), ROWS_PER_BLOCK)])
        ds.context.enable_progress_bars = False
        reader = ray.remote(num_cpus=1)(rank_reads)
        begun = time.time()
        results = ray.get([reader.remote(ds, r, args.world, cfg.train) for r in range(args.world)])
        wall = time.time() - min(s for _, _, s in results)
        total = sum(r for r, _, _ in results)
        assert total == n, f"the ranks read {total} rows of {n}"
        print(f"ranks ({args.world} Ray tasks, each its own iterator over the whole set, bucketing and padding): "
              f"{total:,} rows in {wall:.1f} s = {total / wall:,.0f} rows/s (per rank "
              f"{', '.join(f'{r / s:,.0f}' for r, s, _ in results)} rows/s; {time.time() - begun:.1f} s with task start)",
              flush=True)  # fmt: skip
        ray.shutdown()

        paper = paper_consumption()
        for name, rate in paper:
            print(f"  {name}: training consumes {rate:.2f} rows/s (s2d estimate)")
        need = max(rate for _, rate in paper)
        slower = min(n / tokenize_s, total / wall)
        print(f"RESULT rows={n} tokenize_rows_s={n / tokenize_s:.0f} ranks_rows_s={total / wall:.0f} "
              f"paper_rows_s={need:.2f} headroom={slower / need:.0f}")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
