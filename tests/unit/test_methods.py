import pytest

from s2d_ray.methods import METHODS
from s2d_ray.methods.runner import run_program
from s2d_ray.tasks import LastLetter


class EchoEngine:
    """Records prompts; answers with a step counter (a stand-in for unit tests only)."""

    def __init__(self):
        self.calls = []

    def generate(self, texts, *, n, temperature, top_p, max_tokens):
        from s2d_ray.engine import Completion

        self.calls.append((texts, n))
        return [[Completion(f"out{len(self.calls)}-{i}", 3) for i in range(n)] for _ in texts]


def test_rar2_runs_step_by_step_batched_across_inputs_and_samples():
    engine = EchoEngine()
    inputs = [{"question": "q1"}, {"question": "q2"}]
    res = run_program(engine, METHODS["rar2"], inputs, samples=3, temperature=0.7, top_p=1.0, max_tokens=8)
    assert len(engine.calls) == 2  # one engine call per step
    assert engine.calls[0][1] == 3 and len(engine.calls[0][0]) == 2
    assert engine.calls[1][1] == 1 and len(engine.calls[1][0]) == 6
    assert "(rephrased) out1-0" in engine.calls[1][0][0] and "q1" in engine.calls[1][0][0]
    assert [len(r) for r in res] == [3, 3]
    assert res[0][0].tokens == {"rephrase": 3, "respond": 3} and res[0][0].final.startswith("out2")


def test_every_method_template_only_uses_known_fields():
    task = LastLetter()
    for name, program in METHODS.items():
        program.with_prompts(task.method_prompts.get(name, {})).check_templates(task.template_fields)


def test_unknown_placeholder_is_reported():
    bad = METHODS["rar2"].with_prompts({"respond": "{question} {nothing}"})
    with pytest.raises(ValueError, match=r"unknown placeholder \{nothing\}"):
        bad.check_templates({"question"})
    later = METHODS["rar2"].with_prompts({"rephrase": "{respond}"})
    with pytest.raises(ValueError, match="unknown placeholder"):
        later.check_templates({"question"})
