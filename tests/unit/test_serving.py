"""Route choice, the paired test behind it, and served inputs as the task's own prompts."""

from pathlib import Path

import pytest

from s2d_ray.config import load_config
from s2d_ray.errors import ConfigError, S2DError
from s2d_ray.evaluation import mcnemar
from s2d_ray.serving.routes import choose_mode, load_route, parse_route_flags

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted((ROOT / "jobs" / "local").glob("*.yaml"))


def test_mcnemar_counts_only_the_inputs_where_the_systems_disagree():
    same = [True, False] * 20
    assert mcnemar(same, same)["p"] == 1.0
    six_to_none = mcnemar([True] * 6 + [False] * 4, [False] * 6 + [False] * 4)
    assert six_to_none["only_a"] == 6 and six_to_none["only_b"] == 0
    assert six_to_none["p"] == pytest.approx(2 / 64)  # two-sided exact binomial tail
    assert mcnemar([True] * 8 + [False] * 2, [False] * 8 + [True] * 2)["p"] == pytest.approx(2 * 56 / 1024)
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def test_the_distilled_mode_when_it_is_not_shown_worse():
    s1 = [False] * 30 + [True] * 10
    s2 = [True] * 30 + [True] * 10
    mode, why, figures = choose_mode({"system1": s1, "system2": s2, "distilled": s2[:-1] + [False]})
    assert mode == "distilled" and "not worse" in why and figures["test"].startswith("McNemar")
    assert figures["distilled_vs_system2"]["only_b"] == 1


def test_system2_when_it_beat_system1_and_the_distilled_model_did_not_keep_up():
    s1 = [False] * 30 + [True] * 10
    s2 = [True] * 40
    mode, why, _ = choose_mode({"system1": s1, "system2": s2, "distilled": s1})
    assert mode == "system2" and "did not keep up" in why and "p=" in why


def test_system1_when_system2_did_not_help_significantly():
    s1 = [True] * 20 + [False] * 20
    s2 = [True] * 22 + [False] * 18  # 2 more right: noise at n=40
    assert choose_mode({"system1": s1, "system2": s2})[0] == "system1"
    worse = [False] * 40
    mode, why, _ = choose_mode({"system1": s1, "system2": s2, "distilled": worse})
    assert mode == "system1" and "distilled model was worse" in why


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem)
def test_a_served_input_is_the_prompt_evaluation_used(job):
    cfg = load_config(job)
    task = cfg.task
    for example in task.examples(cfg.eval.split)[:5]:
        served = task.request(example.question)  # the prompt as evaluation wrote it
        assert served.question == example.question
        if task.name != "triviaqa":  # its question_text (the question without the opinion) is the data's, not the prompt's
            assert {k: served.fields.get(k) for k in example.fields} == example.fields
        assert set(example.fields) <= set(served.fields)
        if task.name != "pairwise":  # its body alone gets the task's answer-format instruction
            body = example.question.removesuffix(task.answer_format).rstrip()
            assert task.request(body).question == example.question
    with pytest.raises(ValueError):
        task.request("   ")


def test_last_letter_takes_the_words_alone_and_pairwise_a_json_object():
    cfg = load_config(ROOT / "jobs" / "local" / "last-letter-rar2.yaml")
    served = cfg.task.request("alpha beta")
    assert served.question.startswith('Take the last letter of each word in "alpha beta"') and served.fields == {"words": "alpha beta"}
    pairwise = load_config(ROOT / "jobs" / "local" / "oasst2-bsm-swap.yaml").task
    served = pairwise.request('{"question": "q?", "response_a": "one", "response_b": "two"}')
    assert "[Response A]\none" in served.question and served.fields["response_b"] == "two"
    with pytest.raises(ValueError, match="JSON object"):
        pairwise.request("which is better?")


def test_route_flags_and_run_directories_are_checked_before_anything_starts(tmp_path):
    assert parse_route_flags(("a=system2", "b=distilled")) == {"a": "system2", "b": "distilled"}
    for bad in ("a", "a=fast", "=system1"):
        with pytest.raises(S2DError, match="expected NAME=distilled"):
            parse_route_flags((bad,))
    with pytest.raises(S2DError, match="not a run directory"):
        load_route(tmp_path)


def test_serve_settings_are_validated(tmp_path):
    job = ROOT / "jobs" / "local" / "last-letter-rar2.yaml"
    assert load_config(job).serve.max_replicas == 1
    with pytest.raises(ConfigError, match="serve.min_replicas 3 > serve.max_replicas 2"):
        load_config(job, ["serve.min_replicas=3", "serve.max_replicas=2"])
    with pytest.raises(ConfigError, match="serve.port: unknown key"):
        load_config(job, ["serve.port=80"])


@pytest.mark.parametrize("job, override, gpu_bundles", [
    ("paper/last-letter-rar2-70b.yaml", [], 4),
    ("paper/last-letter-rar2-70b.yaml", ["engine.tensor_parallel=2", "engine.pipeline_parallel=2"], 4),
    ("local/last-letter-rar2.yaml", ["engine.device=cuda", "train.use_gpu=true", "train.backend=nccl"], 0),
])  # fmt: skip
def test_a_replica_reserves_what_its_engine_needs_as_vllm_checks_it(job, override, gpu_bundles):
    """A tensor-parallel replica: one packed placement group, the replica in a GPU-less first
    bundle and one bundle of one GPU per engine worker, which is what vLLM's Ray executor
    counts in the placement group it finds itself in (vllm/v1/executor/ray_utils.py)."""
    from types import SimpleNamespace

    from s2d_ray.serving.server import replica_options

    cfg = load_config(ROOT / "jobs" / job, override)
    options = replica_options(SimpleNamespace(cfg=cfg))
    assert options["autoscaling_config"]["max_replicas"] == cfg.serve.max_replicas
    if gpu_bundles == 0:  # one GPU: the replica's own
        assert options["ray_actor_options"]["num_gpus"] == 1 and "placement_group_bundles" not in options
        return
    bundles = options["placement_group_bundles"]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert bundles[0] == {"CPU": cfg.engine.cpus_per_engine, "GPU": 0}  # where Serve puts the replica itself
    assert options["ray_actor_options"]["num_cpus"] == cfg.engine.cpus_per_engine and "num_gpus" not in options["ray_actor_options"]
    assert all(b.get("GPU", 0) <= 1 for b in bundles) and sum(1 for b in bundles if b.get("GPU")) == gpu_bundles


def test_s2d_serve_refuses_a_folder_that_is_not_a_run_with_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "model").mkdir()  # a user's own folder: read, never written
    for args in ([str(tmp_path)], [str(tmp_path), "--route", "x=fast"]):
        proc = subprocess.run([sys.executable, "-m", "s2d_ray.cli", "serve", *args], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("s2d: error: ") and "Traceback" not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_past_max_in_flight_a_request_is_a_503_with_retry_after_and_nothing_is_queued():
    """The gateway's admission, on its own class: the engine replica's handle is held (a
    stand-in that answers when released), so the requests in flight stay in flight."""
    import asyncio

    from s2d_ray.serving.app import Gateway, RequestError

    class HeldEngine:
        def __init__(self):
            self.release, self.calls = None, 0

        @property
        def answer(self):
            return self

        def remote(self, route, mode, text, options):
            self.calls += 1

            async def wait():
                await self.release.wait()
                return {"text": "Answer: ee", "finish_reason": "stop", "prompt_tokens": 9, "completion_tokens": 3,
                        "mode": mode}  # fmt: skip

            return wait()

    async def scenario():
        engine = HeldEngine()
        engine.release = asyncio.Event()
        route = {"name": "job", "info": {"modes": ["distilled"], "mode": "distilled"}, "servers": {"distilled": "m"},
                 "max_tokens": 64}  # fmt: skip
        own = Gateway.func_or_class.__mro__[1]  # our class, under Serve's ASGI wrapper (whose __init__ serves HTTP)
        gateway = own.__new__(own)
        own.__init__(gateway, [route], {"m": engine}, None, {"max_in_flight": 3, "max_body_kib": 64})
        body = {"model": "job", "messages": [{"role": "user", "content": "apple pie"}]}
        held = [asyncio.ensure_future(gateway._answer(body, "apple pie", None, chat=True)) for _ in range(3)]
        await asyncio.sleep(0)
        assert gateway.in_flight == 3 and engine.calls == 3
        for _ in range(5):  # refused at once, not queued: the engine never sees them
            try:
                await gateway._answer(body, "apple pie", None, chat=True)
                raise AssertionError("admitted past max_in_flight")
            except RequestError as err:
                assert err.status == 503 and err.headers == {"Retry-After": "1"} and err.code == "overloaded"
        assert engine.calls == 3
        engine.release.set()
        answers = await asyncio.gather(*held)
        assert all(a.status_code == 200 for a in answers) and gateway.in_flight == 0
        engine.release = asyncio.Event()
        engine.release.set()
        assert (await gateway._answer(body, "apple pie", None, chat=True)).status_code == 200  # served again

    asyncio.run(scenario())


def test_a_streamed_answer_comes_piece_by_piece_and_every_stream_ends_its_request():
    """On the gateway's own class: a System 1 stream relays the engine's pieces as they
    come; a stream the client left before its first event, and one whose engine failed
    mid-answer (an error event), each still end their request (nothing stays in flight)."""
    import asyncio
    import json

    from s2d_ray.serving.app import Gateway

    class StreamingEngine:
        def __init__(self, pieces, fail_after=None):
            self.pieces, self.fail_after = pieces, fail_after

        def options(self, stream):
            assert stream is True
            return self

        @property
        def answer_stream(self):
            return self

        def remote(self, route, mode, text, options):
            async def gen():
                for i, piece in enumerate(self.pieces):
                    if i == self.fail_after:
                        raise RuntimeError("engine died")
                    yield {"delta": piece}
                yield {"result": {"text": "".join(self.pieces), "finish_reason": "stop", "prompt_tokens": 9,
                                  "completion_tokens": len(self.pieces), "mode": mode}}  # fmt: skip

            return gen()

    async def body_of(response) -> list[dict]:
        events = [chunk async for chunk in response.body_iterator]
        await response.background()
        return [json.loads(e[6:]) for e in events if e.startswith("data: {")]

    async def scenario():
        route = {"name": "job", "info": {"modes": ["distilled"], "mode": "distilled"}, "servers": {"distilled": "m"},
                 "max_tokens": 64}  # fmt: skip
        own = Gateway.func_or_class.__mro__[1]
        body = {"model": "job", "messages": [{"role": "user", "content": "apple pie"}], "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        for engine, check in ((StreamingEngine(["Answer", ":", " e", "e"]), "whole"),
                              (StreamingEngine(["Answer", ":", " e"]), "left"),
                              (StreamingEngine(["Answer", ":", " e"], fail_after=2), "failed")):  # fmt: skip
            gateway = own.__new__(own)
            own.__init__(gateway, [route], {"m": engine}, None, {"max_in_flight": 3, "max_body_kib": 64})
            response = await gateway._answer(body, "apple pie", None, chat=True)
            assert gateway.in_flight == 1
            if check == "left":  # the client went away: Starlette runs the background task only
                await response.background()
                assert gateway.in_flight == 0
                continue
            events = await body_of(response)
            assert gateway.in_flight == 0
            deltas = [e["choices"][0]["delta"].get("content") for e in events if e.get("choices")]
            if check == "whole":
                assert [d for d in deltas if d] == ["Answer", ":", " e", "e"]  # one event per piece
                assert events[-1]["usage"]["completion_tokens"] == 4
                assert gateway.stats.summary()["job:distilled"]["errors"] == 0
            else:
                assert [d for d in deltas if d] == ["Answer", ":"] and events[-1]["error"]["code"] == "engine_unavailable"
                assert gateway.stats.summary()["job:distilled"]["errors"] == 1

    asyncio.run(scenario())
