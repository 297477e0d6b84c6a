"""What a user sees: s2d's own lines and live progress on the terminal; everything else
(Ray, vLLM, DeepSpeed, transformers, Triton) in RUN/logs/.

`terminal()` points the process's stdout and stderr (the file descriptors, so C++ and
child-process output too) at a log file in the run directory, and gives back a `Console`
that writes to the real terminal. With a terminal, a stage's progress is a live bar (rich);
without one (CI, `ray job logs`) it is one plain line every `PLAIN_EVERY_S` seconds.

Pipeline code gets the console as its `log` callable; `progress(log, ...)` gives it a
stage's tracker, or one that does nothing when `log` is a plain function (tests)."""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

PLAIN_EVERY_S = 15.0  # without a terminal: one progress line per stage this often


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Console:
    """s2d's own lines (`console("...")`, prefixed `[s2d]`) and stage progress, on `term`;
    each line also goes to the log file, so the log has the whole story."""

    def __init__(self, term: TextIO, log_file: TextIO | None = None, every_s: float = PLAIN_EVERY_S,
                 tty: bool | None = None):  # fmt: skip
        self.term = term
        self.log_file = log_file
        self.every_s = every_s
        self.tty = term.isatty() if tty is None else tty
        self._live = None  # rich.progress.Progress while a stage is shown
        self._lock = threading.Lock()

    def __call__(self, msg: str) -> None:
        self.line(f"[s2d] {msg}")

    def line(self, text: str) -> None:
        with self._lock:
            if self.log_file is not None:
                self.log_file.write(f"{time.strftime('%H:%M:%S')} {text}\n")
                self.log_file.flush()
            if self.term is None:
                return
            try:
                if self._live is not None:
                    self._live.console.print(text, markup=False, highlight=False, soft_wrap=True)
                else:
                    print(text, file=self.term, flush=True)
            except (OSError, ValueError):  # the terminal went away (a closed pipe, a hangup):
                self.term, self._live = None, None  # the run goes on; the log file has it all

    def progress(self, name: str, total: int, unit: str) -> Tracker:
        return Tracker(self, name, total, unit)

    def _open_bar(self, tracker: Tracker):
        from rich.console import Console as RichConsole
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        try:  # rich would look at fds 0-2 for the width; 1 and 2 are the log file now
            width = os.get_terminal_size(self.term.fileno()).columns
        except (OSError, ValueError, AttributeError):
            width = None
        bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[unit]}"),
            TextColumn("{task.fields[status]}"),
            console=RichConsole(file=self.term, force_terminal=True, width=width), transient=True,
            redirect_stdout=False, redirect_stderr=False, refresh_per_second=4,
        )  # fmt: skip
        bar.start()
        task = bar.add_task(tracker.name, total=tracker.total, unit=tracker.unit, status="starting")
        with self._lock:
            self._live = bar
        return bar, task

    def _close_bar(self, bar) -> None:
        with self._lock:
            self._live = None
        try:
            bar.stop()
        except (OSError, ValueError):  # the terminal went away
            self.term = None


class Tracker:
    """One stage's progress: `update(done, status)`; ETA from the rate so far."""

    def __init__(self, console: Console, name: str, total: int, unit: str):
        self.console, self.name, self.total, self.unit = console, name, max(int(total), 0), unit
        self.done, self.status = 0, ""
        self.started = time.monotonic()
        self._printed = self.started
        self.base = 0  # where this command took up the work (a resumed training's step)
        self._bar = console._open_bar(self) if console.tty and console.term is not None else None
        # Elapsed time and ETA move, and a plain line comes, while nothing finishes (an
        # engine loading a 70B model for minutes).
        self._closed = threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()

    def _beat(self) -> None:
        while not self._closed.wait(1.0):
            self.update()

    def eta(self) -> str:
        if self.done <= self.base or self.done >= self.total:
            return ""
        left = (time.monotonic() - self.started) / (self.done - self.base) * (self.total - self.done)
        return f"ETA {duration(left)}"

    def summary(self) -> str:
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.name}: {self.done}/{self.total} {self.unit}{pct}", self.status,
                 duration(time.monotonic() - self.started), self.eta()]  # fmt: skip
        return ", ".join(p for p in parts if p)

    def update(self, done: int | None = None, status: str | None = None) -> None:
        if self._closed.is_set():  # the heartbeat, late: the stage's last line is out
            return
        if done is not None:
            self.done = min(int(done), self.total) if self.total else int(done)
        if status is not None:
            self.status = status
        if self._bar is not None:
            bar, task = self._bar
            shown = ", ".join(p for p in (self.status, duration(time.monotonic() - self.started), self.eta()) if p)
            try:
                bar.update(task, completed=self.done, status=shown)
            except (OSError, ValueError):
                pass
        elif time.monotonic() - self._printed >= self.console.every_s:
            self._plain_line()

    def _plain_line(self) -> None:
        self._printed = time.monotonic()
        self._printed_at = (self.done, self.status)
        self.console.line(f"[s2d] {self.summary()}")

    def close(self) -> None:
        """The stage ended (or stopped): its last figures, once."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._bar is not None:
            self.console._close_bar(self._bar[0])
            self._bar = None
        if (self.done, self.status) != getattr(self, "_printed_at", None):  # not what the last line said
            self._plain_line()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _NoTracker:
    done = base = 0

    def update(self, done=None, status=None) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def progress(log, name: str, total: int, unit: str):
    """A stage's tracker where `log` is a Console; otherwise one that shows nothing."""
    return log.progress(name, total, unit) if isinstance(log, Console) else _NoTracker()


def log_name(command: str) -> str:
    return f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@contextmanager
def terminal(logs_dir: Path, command: str, verbose: bool = False):
    """Yields a Console on the real terminal while the process's stdout and stderr (fds 1
    and 2, so every library, child process and Ray's streamed worker output) go to a new
    file in `logs_dir`; `verbose` shows that output live on the terminal too. Restored on
    the way out, so a final error line reaches the terminal."""
    try:
        fds = (sys.stdout.fileno(), sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # no real descriptors (an in-process test runner)
        yield Console(sys.stderr)
        return
    # Ray merges identical lines from different processes ("[repeated 5x across cluster]"):
    # the log keeps every line. Read by Ray when it is imported, which is later, here.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logs_dir.mkdir(parents=True, exist_ok=True)
    path = logs_dir / log_name(command)
    log_file = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # first: nothing to undo if refused
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    term = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    # --verbose: the libraries' lines interleave with s2d's, so plain progress lines, no bar
    # (a bar redrawn under text written behind its back leaves copies of itself).
    console = Console(term, log_file, tty=False if verbose else None)
    tee = None
    if verbose:
        read_end, write_end = os.pipe()
        tee = threading.Thread(target=_tee, args=(read_end, console, os.dup(saved[1])), daemon=True)
        tee.start()
        target = write_end
    else:
        target = log_file.fileno()
    for fd in fds:
        os.dup2(target, fd)
    if verbose:
        os.close(target)
    console(f"logs: {path}" + ("" if verbose else " (--verbose shows them here too)"))
    try:
        yield console
    except BaseException as err:  # the log says how it ended, the terminal gets the one line
        if not isinstance(err, SystemExit):
            import traceback

            from s2d_ray.errors import S2DError

            sys.stderr.write("".join(traceback.format_exception(err)))
            if not isinstance(err, S2DError):  # not an error s2d explains in its line: where to look
                console.line(f"[s2d] this command's log: {path}")
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, orig in zip(fds, saved):
            os.dup2(orig, fd)
            os.close(orig)
        if tee is not None:
            tee.join(timeout=2.0)  # a child process may still hold the pipe: don't wait for it
        term.close()
        log_file.close()


def _tee(read_end: int, console: Console, term_fd: int) -> None:
    """--verbose: the libraries' output to the log file and the terminal, byte for byte,
    under the console's lock (s2d's own lines never land inside a library's line)."""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            with console._lock:
                try:
                    console.log_file.flush()
                    console.log_file.buffer.write(chunk)
                    console.log_file.buffer.flush()
                    os.write(term_fd, chunk)
                except (OSError, ValueError):  # the command is ending (the log file is closed), or no terminal
                    pass
    os.close(term_fd)
