"""Zero-shot chain of thought (Kojima et al., 2022): reason step by step, answer last."""

from s2d_ray.methods.base import Program, Step

COT = Program(
    name="cot",
    description="think step by step, then give the final answer after the reasoning",
    steps=(
        Step(
            "reason",
            "{question}\n\nLet's think step by step. Write out the reasoning first, then finish "
            "with the final answer on its own line. {format}",
        ),
    ),
)
