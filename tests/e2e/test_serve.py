"""`s2d serve` on the real stack: Ray Serve, vLLM, the embedded model and a finished run
directory, asked through the `openai` client (and raw HTTP for what a client would not send)."""

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest

from tests.conftest import Command

pytestmark = pytest.mark.e2e
KEY = "test-key-4d1c9b"  # never printed: the test checks the log for it
PORT = 8731


def _raw(path: str, body=None, key: str | None = KEY, data: bytes | None = None, method=None):
    """(status, headers, JSON body) of one request, errors included."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    payload = data if data is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", payload, headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=600) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


@pytest.fixture(scope="module")
def served(pipeline_run):
    out, _ = pipeline_run
    server = Command("serve", [str(out), "--port", str(PORT), "--drain-s", "600"], env={"S2D_API_KEY": KEY})
    server.wait_for(r"serving: http://127\.0\.0\.1:\d+/v1")
    yield out, server
    if server.proc.poll() is None:
        server.proc.kill()
        server.proc.wait()


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=KEY, max_retries=0, timeout=600)


def _route(out) -> str:
    return json.loads((out / "run.json").read_text())["config"]["name"]


def test_models_name_each_route_its_mode_and_why(served, client):
    out, server = served
    name = _route(out)
    models = {m.id: m for m in client.models.list().data}
    assert {name, f"{name}:distilled", f"{name}:system2", f"{name}:system1"} <= set(models)
    info = models[name].model_extra["s2d"]
    assert info["mode"] in ("distilled", "system2", "system1") and info["chosen_by"] == "evaluation"
    assert "McNemar" in info["tests"]["test"] and info["why"]
    assert f"route {name}: {info['mode']} (evaluation)" in server.log  # printed at start


def test_a_served_answer_is_the_evaluated_answer(served, client):
    out, _ = served
    name = _route(out)
    rows = pq.read_table(out / "eval" / "distilled").to_pylist()
    inputs = pq.read_table(out / "eval" / "base", columns=["id", "input"]).to_pylist()
    question = {r["id"]: r["input"] for r in inputs}
    same = 0
    for row in rows:
        reply = client.chat.completions.with_raw_response.create(
            model=f"{name}:distilled", messages=[{"role": "user", "content": question[row["id"]]}], max_tokens=24
        )
        assert reply.headers["x-s2d-route-mode"] == "distilled"
        answer = reply.parse()
        assert answer.model_extra["s2d"]["mode"] == "distilled" and answer.usage.completion_tokens > 0
        same += answer.choices[0].message.content == row["distilled_outputs"][0]
    # Greedy on the same prompt ids; a batch of other sizes may flip one near-tie token.
    assert same >= len(rows) - 1, f"{same} of {len(rows)} served answers equal the evaluated ones"


def test_each_mode_answers_and_system2_counts_every_token(served, client):
    out, _ = served
    name = _route(out)
    usage = {}
    for mode in ("system1", "system2", "distilled"):
        answer = client.chat.completions.create(model=f"{name}:{mode}", messages=[{"role": "user", "content": "apple river"}])
        extra = answer.model_extra["s2d"]
        assert extra["mode"] == mode and answer.choices[0].message.content is not None
        usage[mode] = answer.usage.completion_tokens
        if mode == "system2":  # every step of every sample: 3 samples x 2 steps
            assert extra["samples"] == 3 and set(extra["vote"]) >= {"answer", "count", "total", "kept"}
    assert usage["system2"] > usage["system1"] and usage["system2"] > usage["distilled"]
    completion = client.completions.create(model=f"{name}:distilled", prompt="apple river")
    assert completion.choices[0].text is not None and completion.usage.completion_tokens > 0


def test_streaming_gives_the_same_answer_token_by_token(served, client):
    out, _ = served
    name = _route(out)
    messages = [{"role": "user", "content": "stone cloud"}]
    whole = client.chat.completions.create(model=f"{name}:distilled", messages=messages).choices[0].message.content
    chunks = list(client.chat.completions.create(model=f"{name}:distilled", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == whole and chunks[-1].usage.completion_tokens > 0
    # As the engine makes it, not the whole answer in one event at the end.
    assert chunks[-1].usage.completion_tokens < 3 or len(pieces) >= 2, (pieces, chunks[-1].usage)
    done = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(done) == 1 and done[0].model_extra["s2d"]["mode"] == "distilled"
    # The completions endpoint streams the same way; a System 2 answer comes whole, once voted.
    text = "".join(c.choices[0].text for c in client.completions.create(model=f"{name}:distilled", prompt="stone cloud",
                                                                         stream=True) if c.choices)  # fmt: skip
    assert text == whole
    voted = list(client.chat.completions.create(model=f"{name}:system2", messages=messages, stream=True))
    content = [c.choices[0].delta.content for c in voted if c.choices and c.choices[0].delta.content]
    ended = [c for c in voted if c.choices and c.choices[0].finish_reason]
    assert len(content) == 1 and ended[0].model_extra["s2d"]["mode"] == "system2" and "vote" in ended[0].model_extra["s2d"]


def test_sixteen_concurrent_requests_are_all_answered(served, client):
    out, _ = served
    name = _route(out)
    words = ["apple", "river", "stone", "cloud", "green", "table", "mouse", "light"]

    def ask(i: int) -> str:
        content = f"{words[i % 8]} {words[(i * 3 + 1) % 8]}"
        return client.chat.completions.create(model=name, messages=[{"role": "user", "content": content}]).id

    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(ask, range(16)))
    assert len(set(ids)) == 16


def test_every_bad_request_is_a_4xx_in_openais_shape_and_the_server_goes_on(served):
    out, _ = served
    name = _route(out)
    ok = {"model": name, "messages": [{"role": "user", "content": "apple river"}]}
    cases = {
        "malformed JSON": (dict(data=b'{"model": '), 400),
        "unknown model": (dict(body={**ok, "model": "no-such-route"}), 404),
        "empty messages": (dict(body={**ok, "messages": []}), 400),
        "max_tokens above the limit": (dict(body={**ok, "model": f"{name}:distilled", "max_tokens": 10**6}), 400),
        "prompt longer than the context": (dict(body={**ok, "model": f"{name}:distilled",
                                                      "messages": [{"role": "user", "content": "apple " * 2000}]}), 400),
        "body above the size limit": (dict(data=json.dumps({**ok, "pad": "x" * (2 << 20)}).encode()), 413),
        "unsupported parameter": (dict(body={**ok, "tools": []}), 400),
        "no API key": (dict(body=ok, key=None), 401),
        "a wrong API key": (dict(body=ok, key="not-the-key"), 401),
        "unknown endpoint": (dict(body=ok, method="POST"), 404),
    }  # fmt: skip
    for what, (kw, status) in cases.items():
        path = "/v1/embeddings" if what == "unknown endpoint" else "/v1/chat/completions"
        code, _, body = _raw(path, **kw)
        assert code == status, (what, code, body)
        assert isinstance(body["error"]["message"], str) and body["error"]["type"], (what, body)
    code, _, body = _raw("/v1/chat/completions", ok)
    assert code == 200 and body["choices"][0]["message"]["content"] is not None
    assert "does not fit" in _raw("/v1/chat/completions", cases["prompt longer than the context"][0]["body"])[2]["error"]["message"]
    assert KEY not in server_log(out)


def server_log(out) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (out / "logs").glob("serve-*.log"))


def _replica_pids(kind: str) -> list[int]:
    pids = []
    for cmdline in os.scandir("/proc"):
        if not cmdline.name.isdigit():
            continue
        try:
            with open(f"/proc/{cmdline.name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if cmd.startswith(b"ray::ServeReplica:s2d:engine-" + kind.encode()):
            pids.append(int(cmdline.name))
    return pids


def test_a_killed_engine_replica_is_replaced_and_every_request_after_is_answered(served, client):
    out, _ = served
    name = _route(out)
    [pid] = _replica_pids("distilled")
    results: list[int] = []

    def ask(i: int) -> None:
        code, _, _ = _raw("/v1/chat/completions", {"model": f"{name}:distilled", "messages": [{"role": "user", "content": f"word{i} river"}]})
        results.append(code)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while _raw("/health", key=None)[2]["in_flight"] == 0:  # under load: requests in flight
        assert time.time() < deadline, "no request was ever in flight"
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=600)
    assert set(results) <= {200, 503} and len(results) == 8, results  # never a 500 or a dropped connection
    deadline = time.time() + 600
    while _raw("/v1/chat/completions", {"model": f"{name}:distilled", "messages": [{"role": "user", "content": "a b"}]})[0] != 200:
        assert time.time() < deadline, "the replica was never replaced"
        time.sleep(1)
    assert _replica_pids("distilled") and pid not in _replica_pids("distilled")
    for i in range(8):  # after the replacement: every request answered
        assert client.chat.completions.create(model=f"{name}:distilled", messages=[{"role": "user", "content": f"x{i} y"}]).id


def test_sigterm_drains_the_request_in_flight_and_exits_0(served):
    out, server = served
    name = _route(out)
    results: list[int] = []
    slow = {"model": f"{name}:system2", "messages": [{"role": "user", "content": "apple river stone"}]}
    asking = threading.Thread(target=lambda: results.append(_raw("/v1/chat/completions", slow)[0]))
    asking.start()
    deadline = time.time() + 120
    while _raw("/health", key=None)[2]["in_flight"] == 0:
        assert time.time() < deadline, "the request never arrived"
        time.sleep(0.05)
    server.proc.send_signal(signal.SIGTERM)
    asking.join(timeout=300)
    assert server.proc.wait(timeout=300) == 0, server.log[-3000:]
    assert results == [200], results
    assert "stopping: draining the requests in flight" in server.log
