"""The Ray Serve application of `s2d serve`: one engine deployment per model (base,
distilled), shared by the routes that use it, behind one OpenAI-compatible gateway.

An engine replica runs requests through the same per-sample dataflow as generation and
evaluation (`run_batch` on a `Flow`): a route's prompt is the task's prompt, its chat
template and token ids are the ones training and evaluation used, and a `system2` route
runs the job's method, samples and filter as generation did."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from s2d_ray.config import JobConfig

MODE_HEADER = "x-s2d-route-mode"
# What a request may carry besides model and messages/prompt; anything else is refused.
CHAT_KEYS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "temperature",
             "top_p", "n", "user"}  # fmt: skip
COMPLETION_KEYS = (CHAT_KEYS - {"messages", "max_completion_tokens"}) | {"prompt"}


class RequestError(Exception):
    """A request this server will not answer: its status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers or {}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 503: "service_unavailable"}.get(status)
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ModelServer:
    """One vLLM engine (through `s2d_ray.engine`) and the dataflow turning it, for every
    route that uses this model. A dead or stalled engine fails its requests (the gateway
    answers 503) and this replica's health check, so Serve replaces the replica."""

    def __init__(self, model_path: str, routes: dict[str, JobConfig], threads: int):
        from s2d_ray.engine import Engine
        from s2d_ray.methods.dataflow import Flow
        from s2d_ray.placement import pin_assigned_gpus, runs_on_cpu

        first = next(iter(routes.values()))
        pin_assigned_gpus()
        if not runs_on_cpu(first.engine.device):
            from s2d_ray.generation.actor import _before_gpu_engine

            _before_gpu_engine(first.engine)
        self.routes = routes
        self.model_path = model_path
        self.engine = Engine(model_path, first.engine, dtype=first.model.dtype, seed=first.sampling.seed,
                             chat_template=first.model.chat_template)  # fmt: skip
        limits = ", ".join(f"{k} {v}" for k, v in self.engine.limits.items())
        print(f"serve: engine for {model_path}: vLLM uses {limits}", flush=True)
        # The flow thread owns the engine's tokenizer; usage counts use one of their own.
        from transformers import AutoTokenizer

        self.counting = AutoTokenizer.from_pretrained(model_path)
        self.counting_lock = threading.Lock()
        self.flow = Flow(self.engine)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="s2d-serve")
        self.flow.start(on_error=self._failed)

    async def answer(self, route: str, mode: str, text: str, options: dict) -> dict:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self._answer, route, mode, text, options)

    async def answer_stream(self, route: str, mode: str, text: str, options: dict):
        """A System 1 answer as the engine makes it: {"delta": text} items after engine
        steps, then {"result": ...}, what `answer` returns (its text is the deltas joined)."""
        loop = asyncio.get_running_loop()
        news: asyncio.Queue = asyncio.Queue()

        def on_text(so_far: str) -> None:  # the engine's thread
            loop.call_soon_threadsafe(news.put_nowait, so_far)

        work = loop.run_in_executor(self.pool, self._answer, route, mode, text, options, on_text)
        work.add_done_callback(lambda _: news.put_nowait(None))
        sent = ""
        while (so_far := await news.get()) is not None:
            if len(so_far) > len(sent):
                yield {"delta": so_far[len(sent):]}
                sent = so_far
        result = await work
        if "error" not in result and len(result["text"]) > len(sent):
            yield {"delta": result["text"][len(sent):]}
        yield {"result": result}

    def _answer(self, route: str, mode: str, text: str, options: dict, on_text=None) -> dict:
        import pandas as pd

        from s2d_ray.generation.batch import run_batch
        from s2d_ray.generation.vote import vote_row

        cfg = self.routes[route]
        task = cfg.task
        try:
            example = task.request(text)
        except ValueError as err:
            return {"error": f"not an input of task {task.name}: {err}", "status": 400, "code": "invalid_input"}
        passes = route_passes(cfg, mode, options)
        if mode != "system2":
            return self._direct(cfg, mode, example, passes[0], on_text)
        batch = pd.DataFrame([{"id": uuid.uuid4().hex, "input": example.question, "fields": json.dumps(example.fields)}])
        row = run_batch(self.flow, task, passes, batch, self.engine.max_model_len, wait=self.flow.wait).to_dict("records")[0]
        label = passes[0].label
        failure = next((row[f"{p.label}_failure"] for p in passes if isinstance(row.get(f"{p.label}_failure"), str)), None)
        if failure is not None:
            return _unanswerable(failure)
        prompt = self._prompt_tokens(cfg, example.question)
        tokens = sum(int(row[f"{p.label}_tokens"]) for p in passes)
        outputs, answers = list(row[f"{label}_outputs"]), list(row[f"{label}_answers"])
        out = {"prompt_tokens": prompt, "completion_tokens": tokens, "mode": mode, "samples": len(outputs)}
        vote = vote_row(row, label, cfg.filter)
        chosen = int(row[f"{label}_selected"]) if cfg.filter.name == "usc" else next(
            (i for i, a in enumerate(answers) if a is not None and a == vote.answer), 0)  # fmt: skip
        out["vote"] = {"answer": vote.answer, "count": vote.count, "total": vote.total, "kept": bool(vote.kept),
                       "reason": vote.reason, "filter": cfg.filter.name}  # fmt: skip
        out.update(text=outputs[chosen], answer=answers[chosen], finish_reason="stop")
        return out

    def _direct(self, cfg: JobConfig, mode: str, example, p, on_text=None) -> dict:
        """One System 1 prompt, straight on the dataflow (no table around one row): the
        values, sampling and answer extraction `run_batch` gives evaluation. `on_text`:
        its text so far after each engine step (streamed)."""
        from dataclasses import replace

        from s2d_ray.generation.batch import pass_run
        from s2d_ray.methods.dataflow import BatchRun

        task = cfg.task
        values = {"format": task.answer_format, **example.fields, "question": example.question}
        run = replace(pass_run(p, task, self.engine.max_model_len), stream=on_text)
        work = BatchRun(self.flow, [(run, [values], [uuid.uuid4().hex])])
        self.flow.wait(work)
        (samples,), _, _ = work.outputs(0)
        sample = samples[0]
        if sample.error:
            return _unanswerable(sample.error)
        tokens = sum(sample.tokens.values())
        return {"prompt_tokens": self._prompt_tokens(cfg, example.question), "completion_tokens": tokens, "mode": mode, "samples": 1, "text": sample.final,
                "answer": task.extract(sample.final), "finish_reason": "length" if tokens >= p.max_tokens else "stop"}  # fmt: skip

    def _prompt_tokens(self, cfg: JobConfig, question: str) -> int:
        from s2d_ray.chat import prompt_ids

        with self.counting_lock:
            return len(prompt_ids(self.counting, question, cfg.model.chat_template))

    def _failed(self, err: BaseException) -> None:
        print(f"serve: engine for {self.model_path} failed ({type(err).__name__}: {err}); its requests get 503 and "
              "Serve replaces this replica", flush=True)  # fmt: skip

    def check_health(self) -> None:
        stall = next(iter(self.routes.values())).engine.stall_timeout_s
        idle = time.monotonic() - self.engine.last_progress
        if self.flow.broken is None and stall is not None and self.engine.busy and idle > stall:
            stalled = RuntimeError(f"no engine step finished for {idle:.0f} s (engine.stall_timeout_s {stall:g})")
            self._failed(stalled)
            self.flow.fail(stalled)
        if self.flow.broken is not None:
            try:
                self.engine.kill()  # its engine-core process must not outlive this replica holding a GPU
            except Exception:  # noqa: BLE001 (the replica is replaced all the same)
                pass
            raise RuntimeError(f"engine failed: {self.flow.broken}")


def _unanswerable(reason: str) -> dict:
    code = "context_length_exceeded" if "does not fit" in reason else "invalid_input"
    return {"error": f"the input cannot be answered on this route: {reason}", "status": 400, "code": code}


def route_passes(cfg: JobConfig, mode: str, options: dict) -> list:
    """What one request runs: the System 1 prompt once (greedy unless asked otherwise,
    as evaluation ran it), or the job's System 2 method with its filter's samples."""
    from s2d_ray.generation import Pass
    from s2d_ray.pipeline import generation_passes

    if mode == "system2":
        samples = options.get("samples") or cfg.filter.samples
        job = cfg.model_copy(update={"filter": cfg.filter.model_copy(update={"samples": samples})})
        return generation_passes(job, cfg.program(cfg.method.name))
    temperature = options.get("temperature", 0.0)
    return [Pass(mode, cfg.program("system1"), 1, temperature, options.get("top_p", 1.0),
                 options.get("max_tokens") or cfg.eval.max_tokens)]  # fmt: skip


class Stats:
    """Requests, tokens and latency per route and mode, for the status line."""

    def __init__(self):
        self.by: dict[str, dict] = {}
        self.started = time.monotonic()

    def add(self, key: str, seconds: float, tokens: int, ok: bool) -> None:
        s = self.by.setdefault(key, {"requests": 0, "errors": 0, "tokens": 0, "latency": deque(maxlen=2000),
                                     "window": deque(maxlen=100000)})  # fmt: skip
        s["requests"] += 1
        s["errors"] += not ok
        s["tokens"] += tokens
        if ok:
            s["latency"].append(seconds)
        s["window"].append((time.monotonic(), tokens))

    def summary(self, window_s: float = 15.0) -> dict:
        now = time.monotonic()
        out = {}
        for key, s in self.by.items():
            lat = sorted(s["latency"])
            recent = sum(t for when, t in s["window"] if now - when <= window_s)
            pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None  # noqa: E731
            out[key] = {"requests": s["requests"], "errors": s["errors"], "tokens": s["tokens"],
                        "tokens_per_s": recent / min(window_s, max(now - self.started, 1e-9)),
                        "p50_s": pick(0.50), "p99_s": pick(0.99)}  # fmt: skip
        return out


def _usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}  # fmt: skip


def _extra(result: dict, route: str) -> dict:
    """What s2d adds to a response: the mode used, the answer extracted, the vote."""
    return {**{k: result[k] for k in ("mode", "answer", "samples", "vote") if k in result}, "route": route}


async def _events(rid: str, created: int, model: str, pieces, route: str, include_usage: bool, chat: bool, done):
    """Server-sent events in OpenAI's chunk shape from `pieces`, an async iterator of
    {"delta": text} items (a System 1 answer as it is made; a System 2 answer comes whole,
    once its steps, samples and vote are done) ending with {"result": ...}. An engine that
    fails mid-answer ends the stream with an error event. `done(result or None)` at the end."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choice: dict, **more) -> str:
        body = {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice], **more}
        return f"data: {json.dumps(body)}\n\n"

    result = None
    try:
        if chat:
            yield chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        async for piece in pieces:
            if "result" in piece:
                result = piece["result"]
                break
            delta = {"content": piece["delta"]} if chat else None
            yield chunk({"index": 0, "delta": delta, "finish_reason": None} if chat else
                        {"index": 0, "text": piece["delta"], "finish_reason": None})  # fmt: skip
        if result is None or "error" in result:
            raise RuntimeError(result["error"] if result else "the answer ended early")
        end = {"index": 0, "delta": {}, "finish_reason": result["finish_reason"]} if chat else \
            {"index": 0, "text": "", "finish_reason": result["finish_reason"]}  # fmt: skip
        yield chunk(end, s2d=_extra(result, route))
        if include_usage:
            body = {"id": rid, "object": kind, "created": created, "model": model, "choices": [], "usage": _usage(result)}
            yield f"data: {json.dumps(body)}\n\n"
    except Exception as err:  # noqa: BLE001 (the status line is sent: the stream says it instead)
        print(f"serve: {route}: a streamed answer failed ({type(err).__name__}: {str(err)[:300]})", flush=True)
        message = "the engine serving this route failed mid-answer; retry (Serve replaces it)"
        yield f"data: {json.dumps(error_body(503, message, 'engine_unavailable'))}\n\n"
        result = None
    finally:
        done(result)
    yield "data: [DONE]\n\n"


async def _chain(first: dict, rest):
    yield first
    async for piece in rest:
        yield piece


async def _whole(result: dict):
    """A finished answer as `_events` pieces."""
    yield {"delta": result["text"]}
    yield {"result": result}


# Everything the gateway uses is defined above it: Serve ships the ingress class by value.
app = FastAPI(title="s2d serve", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(RequestError)
async def _refused(request: Request, err: RequestError):
    return JSONResponse(error_body(err.status, err.message, err.code, err.param), err.status, headers=err.headers)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException):
    message = f"no such endpoint: {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
    return JSONResponse(error_body(err.status_code, message), err.status_code)


@serve.deployment(name="gateway", ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Gateway:
    """Authentication, validation, limits and routing; the engines do the work."""

    def __init__(self, routes: list[dict], servers: dict, key_digest: str | None, limits: dict):
        self.routes = {r["name"]: r for r in routes}
        self.servers = servers
        self.key_digest = key_digest
        self.limits = limits
        self.in_flight = 0
        self.draining = False
        self.stats = Stats()

    @app.get("/health")
    async def health(self):
        return {"status": "ok", "routes": sorted(self.routes), "in_flight": self.in_flight}

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        data = []
        for r in self.routes.values():
            data.append({"id": r["name"], "object": "model", "created": r["created"], "owned_by": "s2d", "s2d": r["info"]})
            for mode in r["info"]["modes"]:
                data.append({"id": f"{r['name']}:{mode}", "object": "model", "created": r["created"], "owned_by": "s2d",
                             "s2d": {"mode": mode, "chosen_by": "model id", "route": r["name"]}})  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        body = await self._body(request)
        self._only(body, CHAT_KEYS)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages: a non-empty list of messages is required", param="messages")
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise RequestError(400, "messages: no user message (its content is the task's input)", param="messages")
        content = users[-1].get("content")
        if isinstance(content, list):  # content parts: their text, in order
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            content = "\n".join(p for p in parts if isinstance(p, str)) if len(parts) == len(content) else None
        if not isinstance(content, str):
            raise RequestError(400, "messages: the last user message's content must be text", param="messages")
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        return await self._answer(body, content, limit, chat=True)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        body = await self._body(request)
        self._only(body, COMPLETION_KEYS)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(400, "prompt: one prompt as text is required", param="prompt")
        return await self._answer(body, prompt, body.get("max_tokens"), chat=False)

    def stats_summary(self) -> dict:
        return {"in_flight": self.in_flight, "routes": self.stats.summary()}

    def drain(self) -> int:
        """Stopping: new requests get 503 from now on; returns the requests still in flight."""
        self.draining = True
        return self.in_flight

    def _authorize(self, request: Request) -> None:
        if self.key_digest is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        digest = hashlib.sha256(token.encode()).hexdigest()
        if not token or not hmac.compare_digest(digest, self.key_digest):
            raise RequestError(401, "a valid API key is required: Authorization: Bearer <key>", "invalid_api_key")

    async def _body(self, request: Request) -> dict:
        self._authorize(request)
        cap = self.limits["max_body_kib"] * 1024
        parts, size = [], 0
        async for chunk in request.stream():  # read to the end (a client still sending must not see a reset),
            size += len(chunk)  # but never held past the limit
            if size <= cap:
                parts.append(chunk)
        if size > cap:
            raise RequestError(413, f"request body of {size} bytes is over the limit of {cap} (serve.max_body_kib)")
        raw = b"".join(parts)
        try:
            body = json.loads(raw)
        except ValueError as err:
            raise RequestError(400, f"the body is not valid JSON ({err})") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        return body

    @staticmethod
    def _only(body: dict, allowed: set) -> None:
        for key in body:
            if key not in allowed:
                raise RequestError(400, f"unsupported parameter: {key!r} (supported: {', '.join(sorted(allowed))})",
                                   "unsupported_parameter", key)  # fmt: skip
        if body.get("n", 1) != 1:
            raise RequestError(400, "n: one choice per request is supported", "unsupported_parameter", "n")

    def _route(self, body: dict) -> tuple[dict, str]:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise RequestError(400, "model: a route name is required (GET /v1/models lists them)", param="model")
        name, _, mode = model.partition(":")
        route = self.routes.get(name)
        if route is None or (mode and mode not in route["info"]["modes"]):
            raise RequestError(404, f"model {model!r} does not exist; routes: {', '.join(sorted(self.routes))}",
                               "model_not_found", "model")  # fmt: skip
        return route, mode or route["info"]["mode"]

    def _options(self, body: dict, route: dict, mode: str, limit) -> dict:
        options = {}
        cap = route["max_tokens"]
        if limit is not None:
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise RequestError(400, "max_tokens: a positive integer is required", param="max_tokens")
            if limit > cap:
                raise RequestError(400, f"max_tokens {limit} is above this route's limit of {cap}", param="max_tokens")
            options["max_tokens"] = limit
        for key, low, high in (("temperature", 0.0, 2.0), ("top_p", 1e-6, 1.0)):
            value = body.get(key)
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
                raise RequestError(400, f"{key}: a number from {low:g} to {high:g} is required", param=key)
            if mode == "system2":
                raise RequestError(400, f"{key}: a system2 route samples as its job does "
                                   f"(sampling.{key}); ask a System 1 mode for your own", "unsupported_parameter", key)  # fmt: skip
            options[key] = float(value)
        if mode == "system2" and self.limits.get("samples"):
            options["samples"] = self.limits["samples"]
        if mode == "system2" and limit is not None:
            raise RequestError(400, "max_tokens: a system2 route generates each step as its job does "
                               "(sampling.max_tokens)", "unsupported_parameter", "max_tokens")  # fmt: skip
        return options

    async def _answer(self, body: dict, text: str, limit, chat: bool):
        route, mode = self._route(body)
        options = self._options(body, route, mode, limit)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, "stream: true or false", param="stream")
        if self.draining:
            raise RequestError(503, "the server is stopping", "stopping", headers={"Retry-After": "10"})
        if self.in_flight >= self.limits["max_in_flight"]:
            raise RequestError(503, f"overloaded: {self.in_flight} requests in flight (serve.max_in_flight); retry",
                               "overloaded", headers={"Retry-After": "1"})  # fmt: skip
        key = f"{route['name']}:{mode}"
        started = time.perf_counter()
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        headers = {MODE_HEADER: mode}
        include = stream and isinstance(body.get("stream_options"), dict) and bool(body["stream_options"].get("include_usage"))
        server = self.servers[route["servers"][mode]]
        self.in_flight += 1
        ended = False

        def end(result: dict | None) -> None:  # once per request, however it ends
            nonlocal ended
            if not ended:
                ended = True
                self.in_flight -= 1
                ok = result is not None and "error" not in result
                self.stats.add(key, time.perf_counter() - started, result["completion_tokens"] if ok else 0, ok)

        try:
            if stream and mode != "system2":  # token by token: the first piece before the status line
                pieces = server.options(stream=True).answer_stream.remote(route["name"], mode, text, options)
                first = await pieces.__anext__()
                result = first.get("result")
            else:
                result = await server.answer.remote(route["name"], mode, text, options)
        except Exception as err:  # noqa: BLE001 (an engine replica died or failed: retry later)
            end(None)
            print(f"serve: {key}: engine replica failed ({type(err).__name__}: {str(err)[:300]})", flush=True)
            raise RequestError(503, "the engine serving this route failed; retry (Serve replaces it)",
                               "engine_unavailable", headers={"Retry-After": "5"}) from None  # fmt: skip
        if result is not None and "error" in result:
            end(None)
            raise RequestError(result["status"], result["error"], result.get("code"))
        if stream:
            if result is not None:  # whole already: a System 2 answer (or a stream that ended at once)
                pieces = _whole(result)
            else:
                pieces = _chain(first, pieces)
            events = _events(rid, created, body["model"], pieces, route["name"], include, chat, end)
            # A client gone before the first event: the stream never starts, its `finally`
            # never runs; the background task still ends the request (once: `end` is idempotent).
            return StreamingResponse(events, media_type="text/event-stream", headers=headers,
                                     background=BackgroundTask(end, None))  # fmt: skip
        end(result)
        usage, extra = _usage(result), _extra(result, route["name"])
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                      "finish_reason": result["finish_reason"], "logprobs": None}  # fmt: skip
        else:
            choice = {"index": 0, "text": result["text"], "finish_reason": result["finish_reason"], "logprobs": None}
        payload = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                   "model": body["model"], "choices": [choice], "usage": usage, "s2d": extra}  # fmt: skip
        return JSONResponse(payload, headers=headers)
