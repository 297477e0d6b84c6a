"""`s2d serve`: Ray (local or a cluster), the Serve application, the start-up lines, a
status line every 15 s, and a drained stop on Ctrl-C or SIGTERM."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import threading
import time
import urllib.request

from s2d_ray.errors import S2DError
from s2d_ray.serving.routes import Route

STATUS_EVERY_S = 15.0
STARTUP_TIMEOUT_S = 1800.0


def engine_key(route: Route, model: str) -> str:
    """Routes on the same model folder with the same engine settings share its replicas."""
    cfg = route.cfg
    settings = [route.models[model], cfg.engine.model_dump(mode="json"), cfg.model.dtype, cfg.model.chat_template]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def replica_options(route: Route) -> dict:
    """Ray resources and autoscaling of one model's engine replicas, from the job."""
    from s2d_ray.placement import fake_gpus

    e, s = route.cfg.engine, route.cfg.serve
    options = {
        "autoscaling_config": {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
                               "target_ongoing_requests": s.target_ongoing_requests},
        "max_ongoing_requests": s.max_ongoing_requests,
        "graceful_shutdown_timeout_s": s.drain_s,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 60.0,
    }  # fmt: skip
    env = {"S2D_FAKE_GPUS": "1"} if fake_gpus() else {}
    if e.device == "cpu" or e.gpus_per_engine == 1:
        gpus = 0 if e.device == "cpu" else 1
        options["ray_actor_options"] = {"num_cpus": e.cpus_per_engine, "num_gpus": gpus, "runtime_env": {"env_vars": env}}
    else:  # a tensor-parallel engine: the replica and its GPU workers packed on one node
        options["ray_actor_options"] = {"num_cpus": e.cpus_per_engine, "runtime_env": {"env_vars": env}}
        options["placement_group_bundles"] = [{"CPU": e.cpus_per_engine, "GPU": 0}] + [{"GPU": 1}] * e.gpus_per_engine
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


def build_app(routes: list[Route], key_digest: str | None, samples: int | None):
    from s2d_ray.serving.app import Gateway, ModelServer
    from ray import serve

    servers, by_key, described = {}, {}, []
    for route in routes:
        for model in sorted({route.model_of(m) for m in route.modes}):
            key = engine_key(route, model)
            by_key.setdefault(key, (route, model, {}))[2][route.name] = route.cfg
    for key, (route, model, cfgs) in by_key.items():
        deployment = serve.deployment(ModelServer, name=f"engine-{model}-{key}", **replica_options(route))
        servers[key] = deployment.bind(route.models[model], cfgs, route.cfg.serve.max_ongoing_requests)
    for route in routes:
        e = route.cfg.engine
        described.append({
            "name": route.name, "info": route.describe(), "created": int(os.path.getmtime(route.run)),
            "servers": {m: engine_key(route, route.model_of(m)) for m in route.modes},
            "max_tokens": min(route.cfg.serve.max_tokens or e.max_model_len, e.max_model_len),
        })  # fmt: skip
    first = routes[0].cfg.serve
    limits = {"max_in_flight": first.max_in_flight, "max_body_kib": first.max_body_kib, "samples": samples}
    # Serve's default lets 5 requests at a time into a replica: the gateway only waits on
    # engines, so it takes all it may hold; past max_in_flight it answers 503 itself, and
    # Serve's own queue in front of it stays short (Serve answers 503 past it).
    gateway = Gateway.options(max_ongoing_requests=first.max_in_flight + 64, max_queued_requests=64)
    return gateway.bind(described, servers, key_digest, limits)


def app_from_args(args: dict):
    """Serve's application builder (a Serve config file's or a KubeRay RayService's
    `import_path: s2d_ray.serving.server:app_from_args`): `args` holds `run_dirs`, and
    optionally `routes` ({name: mode}) and `samples`; the API key is $S2D_API_KEY."""
    from s2d_ray.serving.routes import load_routes

    run_dirs = args.get("run_dirs")
    if not isinstance(run_dirs, list) or not run_dirs:
        raise S2DError("serve args: run_dirs must list the run directories to serve")
    routes = load_routes([str(d) for d in run_dirs], dict(args.get("routes") or {}))
    key = os.environ.get("S2D_API_KEY") or None
    return build_app(routes, hashlib.sha256(key.encode()).hexdigest() if key else None, args.get("samples"))


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
            return reply.status == 200
    except OSError:
        return False


def _status_line(summary: dict) -> str:
    parts = []
    for key, s in sorted(summary["routes"].items()):
        lat = "" if s["p50_s"] is None else f", p50 {s['p50_s']:.2f} s, p99 {s['p99_s']:.2f} s"
        errors = f" ({s['errors']} failed)" if s["errors"] else ""
        parts.append(f"{key}: {s['requests']} requests{errors}, {s['tokens_per_s']:.0f} tok/s{lat}")
    return "serve: " + ("; ".join(parts) if parts else "no requests yet") + f"; {summary['in_flight']} in flight"


def serve_forever(routes: list[Route], host: str, port: int, address: str | None, key: str | None,
                  samples: int | None, log) -> None:  # fmt: skip
    """Serve until Ctrl-C or SIGTERM, then drain the requests in flight and return."""
    import ray
    from ray import serve

    stop = threading.Event()
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    num_cpus = None
    if address == "local":
        # Ray starts its workers at niceness 15: an engine replica would lose every core it
        # shares to the proxy, the gateway and the clients (measured: 0.6x of vLLM's own
        # server on 2 cores). A cluster's Ray keeps its own setting.
        os.environ.setdefault("RAY_worker_niceness", "0")  # every model's first replica fits (on a laptop they share its cores)
        engines = {engine_key(r, r.model_of(m)): r.cfg for r in routes for m in r.modes}
        need = sum(c.engine.cpus_per_engine * c.serve.min_replicas for c in engines.values())
        num_cpus = routes[0].cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(need))
    ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=True, logging_level="WARNING")
    url = f"http://{host}:{port}"
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init: Ray's core installs handlers of its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
        digest = hashlib.sha256(key.encode()).hexdigest() if key else None
        for route in routes:
            log(f"route {route.name}: {route.mode} ({route.chosen_by}): {route.why}")
        log(f"starting {len({engine_key(r, r.model_of(m)) for r in routes for m in r.modes})} engine deployment(s); "
            "the first start takes a minute on a laptop")  # fmt: skip
        app = build_app(routes, digest, samples)
        started: dict = {}

        def deploy() -> None:  # in a thread: a stop asked while the engines load is heard at once
            try:
                started["handle"] = serve.run(app, name="s2d", route_prefix="/", blocking=False)
            except BaseException as err:  # noqa: BLE001 (reported by the main thread)
                started["error"] = err

        deploying = threading.Thread(target=deploy, daemon=True)
        deploying.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while deploying.is_alive() or not _answers(url):
            if "error" in started:
                err = started["error"]
                raise S2DError(f"the server did not start: {type(err).__name__}: "
                               f"{str(err).strip().splitlines()[-1][:500]} (the log has the replicas' tracebacks)")  # fmt: skip
            if stop.is_set():
                log("stopped before the server was up")
                return
            if time.monotonic() > deadline:
                raise S2DError(f"the server did not answer within {STARTUP_TIMEOUT_S:.0f} s (the log says what it waits for)")
            time.sleep(0.5)
        handle = started["handle"]
        log(f"serving: {url}/v1" + (" (API key required)" if key else ""))
        while not stop.wait(STATUS_EVERY_S):
            try:
                log(_status_line(handle.stats_summary.remote().result(timeout_s=10)))
            except Exception as err:  # noqa: BLE001 (a status line is never worth stopping for)
                log(f"serve: no status this time ({type(err).__name__})")
        log("stopping: draining the requests in flight")
        deadline = time.monotonic() + routes[0].cfg.serve.drain_s
        try:
            while handle.drain.remote().result(timeout_s=10) and time.monotonic() < deadline:
                time.sleep(0.2)
        except Exception as err:  # noqa: BLE001 (stop all the same)
            log(f"serve: could not drain ({type(err).__name__}); stopping")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    log("stopped")
