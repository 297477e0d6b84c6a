"""Full fine-tuning with DeepSpeed ZeRO-3 in a Ray Train worker group.

Each worker reads its Ray Data shard of the distillation set, trains on
(prompt -> final answer) with the prompt masked out of the loss, and the ranks export a
Hugging Face safetensors checkpoint that is handed back through Ray Train.

- `zero3`: the only module that imports DeepSpeed (config, model, engine, groups);
- `data`: tokenization, masking, length-bucketed micro-batches;
- `loop`: what every worker runs;  `checkpoints`: saving, resuming, finding an export;
- `export`: the streamed safetensors export;  `progress`: the per-step file and its reader;
- `driver`: `train` / `train_stream`, the Ray Train trainer from the driver.
"""

from s2d_ray.training.checkpoints import READY, TRAIN_STATE, ZERO_TAG, checkpoint_interval, complete_export, finished_export
from s2d_ray.training.data import IGNORE, bucketed, collate, encode, micro_batches, tokenized, total_steps
from s2d_ray.training.driver import TRAINED_FROM, EmptyDistillSet, train, train_stream
from s2d_ray.training.export import consolidated_export, export_hf, write_safetensors
from s2d_ray.training.loop import train_loop, train_micro_batch
from s2d_ray.training.progress import StepWatch, read_steps
from s2d_ray.training.zero3 import (
    build_zero3_config, free_port, load_zero3_model, local_process_group, lr_factor, lr_schedule,
)  # fmt: skip

__all__ = [
    "IGNORE", "READY", "TRAINED_FROM", "TRAIN_STATE", "ZERO_TAG", "EmptyDistillSet", "StepWatch", "build_zero3_config",
    "bucketed", "checkpoint_interval", "collate", "complete_export", "consolidated_export", "encode", "export_hf",
    "finished_export", "free_port", "load_zero3_model", "local_process_group", "lr_factor", "lr_schedule", "micro_batches",
    "read_steps", "tokenized", "total_steps", "train", "train_loop", "train_micro_batch", "train_stream",
    "write_safetensors",
]  # fmt: skip
