"""Serving distilled runs: `s2d serve` (server.py) puts each run directory behind an
OpenAI-compatible route on Ray Serve (app.py), in the mode its evaluation proved (routes.py)."""
