"""Branch-Solve-Merge (Saha et al., 2023) for pairwise judging of two responses.

branch: propose up to five criteria for this question; solve: one call per criterion
scoring both responses 1-5; merge: one verdict, [[A]], [[B]] or [[C]] for a tie.
"""

from s2d_ray.methods.base import Program, Step

_PAIR = (
    "[Question]\n{question_text}\n\n"
    "[Response A]\n{response_a}\n[End of response A]\n\n"
    "[Response B]\n{response_b}\n[End of response B]\n\n"
)

BSM = Program(
    name="bsm",
    description="branch into up to 5 criteria, score A and B per criterion (1-5), merge into a verdict",
    needs="a pairwise judge task (question_text, response_a, response_b)",
    steps=(
        Step(
            "branch",
            "We want to decide which of two responses to the question below is better.\n\n"
            "[Question]\n{question_text}\n\n"
            "List at most five criteria that matter most for judging responses to this question, "
            "one per line, numbered 1 to 5. Write only the criteria, no responses.",
        ),
        Step(
            "solve",
            _PAIR + "Criterion: {item}\n\nJudge both responses on this criterion only. Explain in one or "
            "two sentences, then end with scores from 1 (poor) to 5 (excellent) in the form "
            '"Score A: <1-5>, Score B: <1-5>".',
            over="branch",
            max_items=5,
        ),
        Step(
            "merge",
            _PAIR + "Evaluations of both responses, criterion by criterion:\n{solve}\n\n"
            "Weigh these evaluations and decide which response is better overall. Output your final "
            'verdict strictly as "[[A]]" if response A is better, "[[B]]" if response B is better, '
            'or "[[C]]" for a tie.',
        ),
    ),
)
