"""Pairwise LLM-as-a-judge: which of two responses to a question is better?

Reads MT-bench human judgments (`question_id`, `model_a`, `model_b`, `winner`,
`conversation_a`, `conversation_b`, `turn`) and plain pairs for OASST2-style data
(`question`, `response_a`, `response_b`, `winner`), record by record. Verdicts are
`A`, `B` or `C` (tie); metrics are agreement with the human label and the share of
inputs whose verdict changes when A and B are swapped.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field

from s2d_ray.errors import DataError
from s2d_ray.tasks.base import Example, accuracy
from s2d_ray.tasks.data import FileTask, get

_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_LOOSE = re.compile(r"\[\s*([ABC])\s*\]|verdict\s*(?:is\s*:?|:)\s*\**\s*([ABC])\b", re.IGNORECASE)
_WINNER = {"model_a": "A", "model_b": "B", "tie": "C", "tie (bothbad)": "C"}
_SWAP = {"A": "B", "B": "A", "C": "C"}
_JUDGED = re.compile(
    r"\[Question\]\n(.*)\n\n\[Response A\]\n(.*)\n\[End of response A\]\n\n\[Response B\]\n(.*)\n\[End of response B\]",
    re.DOTALL,
)


def judge_prompt(question: str, a: str, b: str, answer_format: str) -> str:
    return (
        "Act as an impartial judge of two AI assistants' responses to the user question below. "
        "Decide which response is better: more helpful, correct, relevant and clear. Do not let the "
        "order or the length of the responses sway you.\n\n"
        f"[Question]\n{question}\n\n[Response A]\n{a}\n[End of response A]\n\n"
        f"[Response B]\n{b}\n[End of response B]\n\n{answer_format}"
    )


def _turns(conversation: list, turn: int, where: str, field: str) -> tuple[str, str]:
    users = [m.get("content", "") for m in conversation if isinstance(m, dict) and m.get("role") == "user"]
    bots = [m.get("content", "") for m in conversation if isinstance(m, dict) and m.get("role") == "assistant"]
    if not all(isinstance(t, str) for t in users + bots):
        raise DataError(f"{where}: field {field!r} has a message whose content is not text")
    if len(users) < turn or len(bots) < turn:
        raise DataError(f"{where}: field {field!r} has no turn {turn}")
    if turn == 1:
        return users[0], bots[0]
    # A later turn: the judge sees the earlier exchange as context of the question.
    history = "\n".join(f"(turn {i + 1}) user: {users[i]}" for i in range(turn - 1))
    answers = "\n".join(f"(turn {i + 1}) {bots[i]}" for i in range(turn))
    return f"{history}\n(turn {turn}) user: {users[turn - 1]}\nJudge the responses to turn {turn}.", answers


class Pairwise(FileTask):
    name: Literal["pairwise"] = "pairwise"
    metric: str = "agreement"
    answer_format: str = 'End with your verdict: "[[A]]" if A is better, "[[B]]" if B is better, "[[C]]" for a tie.'
    # MT-bench records: which turns to judge.
    turns: list[Literal[1, 2]] = Field(default_factory=lambda: [1, 2])

    def example(self, record: dict, id: str, where: str) -> Example:
        winner = record.get("winner")
        if "conversation_a" in record or "turn" in record:
            turn = get(record, "turn", where, int)
            question, a = _turns(get(record, "conversation_a", where, list), turn, where, "conversation_a")
            _, b = _turns(get(record, "conversation_b", where, list), turn, where, "conversation_b")
            group = f"turn{turn}"
        else:
            question = get(record, "question", where, str)
            a, b = get(record, "response_a", where, str), get(record, "response_b", where, str)
            group = None
        if winner is not None and winner not in _WINNER:
            raise DataError(f"{where}: field 'winner' is {winner!r}; expected one of {', '.join(_WINNER)}")
        values = {"question_text": question, "response_a": a, "response_b": b}
        return Example(id, judge_prompt(question, a, b, self.answer_format), _WINNER.get(winner), values, group)

    def examples(self, split: str) -> list[Example]:
        return [e for e in super().examples(split) if e.group is None or int(e.group[4:]) in self.turns]

    def extract(self, text: str) -> str | None:
        found = _VERDICT.findall(text)
        if found:
            return found[-1]
        loose = _LOOSE.findall(text)
        return next((x for x in reversed([a or b for a, b in loose]) if x), None) if loose else None

    def answer_space(self) -> int | None:
        return 3  # A, B or C (a tie): the extractor yields nothing else

    def target(self, answer: str) -> str:
        return f"[[{answer}]]"

    @property
    def template_fields(self) -> set[str]:
        return {"question", "format", "question_text", "response_a", "response_b"}

    def request(self, text: str) -> Example:
        """A JSON object {"question", "response_a", "response_b"}, or the judge prompt itself."""
        import json

        try:
            values = json.loads(text)
        except ValueError:
            found = _JUDGED.search(text)
            values = dict(zip(("question", "response_a", "response_b"), found.groups())) if found else None
        keys = ("question", "response_a", "response_b")
        if not isinstance(values, dict) or not all(isinstance(values.get(k), str) and values[k].strip() for k in keys):
            raise ValueError('a pairwise input is a JSON object {"question": ..., "response_a": ..., "response_b": ...} '
                             "(or the judge prompt itself)")  # fmt: skip
        q, a, b = (values[k] for k in keys)
        fields = {"question_text": q, "response_a": a, "response_b": b}
        return Example("request", judge_prompt(q, a, b, self.answer_format), None, fields)

    def perturb(self, values: dict[str, str]) -> dict[str, str]:
        a, b = values["response_b"], values["response_a"]
        question = judge_prompt(values["question_text"], a, b, self.answer_format)
        return {**values, "response_a": a, "response_b": b, "question": question}

    def unperturb(self, answer: str | None) -> str | None:
        return _SWAP.get(answer) if answer else None

    def metrics(self, predictions: list, golds: list, groups: list, perturbed: list | None = None) -> dict:
        out = super().metrics(predictions, golds, groups, perturbed)
        if perturbed is not None:
            # An unparsed verdict in either order counts as inconsistent.
            changed = [float(p is None or p != q) for p, q in zip(predictions, perturbed)]
            out["inconsistent"], out["inconsistent_stderr"] = accuracy(changed)
        return out
