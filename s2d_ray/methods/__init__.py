"""Registry of System 2 methods (and the System 1 baseline). Add a file, add a line."""

from s2d_ray.methods.base import Program, Step, placeholders, render, split_items
from s2d_ray.methods.bsm import BSM
from s2d_ray.methods.cot import COT
from s2d_ray.methods.rar import RAR1, RAR2
from s2d_ray.methods.s2a import S2A
from s2d_ray.methods.system1 import PROGRAM as SYSTEM1

METHODS: dict[str, Program] = {p.name: p for p in (SYSTEM1, RAR1, RAR2, S2A, BSM, COT)}


def check_prompt_overrides(name: str, prompts: dict[str, str]) -> None:
    """Raise ValueError for overrides naming a step the method does not have."""
    METHODS[name].with_prompts(prompts)


__all__ = ["METHODS", "Program", "Step", "check_prompt_overrides", "placeholders", "render", "split_items"]
