"""System 2 generation at scale: inputs -> generator actor pool -> vote -> Parquet parts.

Ray Data streams the inputs through an autoscaling pool of `GeneratorActor`s (one vLLM
engine each) and then through the voting stage; the driver writes every finished block
as one Parquet part, atomically. A rerun reads the ids already in the output folder and
only generates the rest, so each id lands exactly once.

- `stage`: what a stage runs (`Pass`, `EngineStage`);
- `actor`: `GeneratorActor` and its engine's health;  `health`: deaths over a stage;
- `batch`: every pass over one batch, on the per-sample dataflow;
- `vote`: the filter over each input, the distillation rows;
- `dataset`: the Ray Data pipeline (and its streaming variant);
- `parts`: the output folder (resume, retries, reading back);
- `run`: `run_passes`, one stage from the driver.
"""

from s2d_ray.generation.actor import GeneratorActor, engine_env
from s2d_ray.generation.batch import NO_ANSWER, pass_run, run_batch
from s2d_ray.generation.dataset import PartWriter, batch_rows, distillation_stream, generation_dataset, input_rows
from s2d_ray.generation.health import EngineFailed, EngineHealth, engine_failure, engine_health
from s2d_ray.generation.parts import compact, drop_failed, finished_ids, load_results
from s2d_ray.generation.run import run_passes
from s2d_ray.generation.stage import EngineStage, Pass
from s2d_ray.generation.vote import DISTILL_SCHEMA, distill_rows, diversity, vote_batch, vote_row

__all__ = [
    "DISTILL_SCHEMA", "NO_ANSWER", "EngineFailed", "EngineHealth", "EngineStage", "GeneratorActor", "Pass", "PartWriter",
    "batch_rows", "compact", "distill_rows", "distillation_stream", "diversity", "drop_failed", "engine_env", "engine_failure",
    "engine_health", "finished_ids", "generation_dataset", "input_rows", "load_results", "pass_run", "run_batch",
    "run_passes", "vote_batch", "vote_row",
]  # fmt: skip
