"""Rephrase and Respond (Deng et al., 2023), one-step and two-step."""

from s2d_ray.methods.base import Program, Step

RAR1 = Program(
    name="rar1",
    description="rephrase and expand the question, then respond, in one prompt",
    steps=(
        Step(
            "respond",
            "{question}\n\nRephrase and expand the question above, then respond to it. "
            "End with the final answer. {format}",
        ),
    ),
)

RAR2 = Program(
    name="rar2",
    description="call 1 rephrases the question; call 2 answers given original and rephrased",
    steps=(
        Step(
            "rephrase",
            "{question}\n\nRephrase and expand the question above so that it is easier to answer. "
            "Keep all the information of the original question. Do not answer it.",
        ),
        Step(
            "respond",
            "(original) {question}\n(rephrased) {rephrase}\n\n"
            "Use the rephrased question to answer the original question. {format}",
        ),
    ),
)
