"""System 2 Attention (Weston & Sukhbaatar, 2023): regenerate the input without the
opinions and irrelevant parts, then answer from the regenerated input only."""

from s2d_ray.methods.base import Program, Step

S2A = Program(
    name="s2a",
    description="call 1 rewrites the input keeping only unbiased, relevant content; call 2 answers from it alone",
    steps=(
        Step(
            "rewrite",
            "Here is a message from a user:\n\n{question}\n\n"
            "Rewrite this message so that it keeps only the facts and the actual question. "
            "Leave out the user's opinions, guesses and suggested answers, and anything that does "
            "not help to answer the question. Write only the rewritten message.",
        ),
        # The original input is deliberately absent: the answer sees only the rewrite.
        Step("answer", "{rewrite}\n\nAnswer the question above. {format}"),
    ),
)
