"""The engine in a process of its own, behind the same interface as `Engine` (check,
generate, close, stats, tokenizer, max_seq_len): what a CPU replica serves with.

Why a process: in one process the engine thread's Python between torch ops (a few hundred
small ops a step for a small model) and the replica's event loop (HTTP, SSE, Serve's
relaying) take turns on one GIL, so a replica never used more than one core, and a new
request's prefill waited for the event loop's turn at every op. Here the engine thread has a
process and a GIL to itself; the replica's event loop only parses, queues and relays.

The bridge is one socket pair carrying pickled messages (multiprocessing's Connection):

    replica -> engine:  ("gen", key, prompt_ids, params) | ("cancel", key) | ("close",) | ("ping",)
    engine -> replica:  ("out", [(key, Output or exception), ...], stats)  one per step and sink
                        ("stats", stats)  when the running/waiting counts changed without output
                        ("closed", stats)  every request submitted has finished
                        ("pong", stats)  the answer to a ping (`unanswered_s`: a hung process)

The replica reads on its event loop (`add_reader`: no thread of its own), so a step's outputs
cost it one wake-up. The engine process reads requests on its main thread and hands them to
`Engine.submit`; its engine thread sends each step's outputs itself. It exits when the
replica closes it or when the socket closes (the replica died): then it drops every request
in flight at the next step.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Sequence
from multiprocessing.connection import Connection

from raylm.serve.sampling import (EngineClosed, EngineProcessDied, Output, Outputs, SamplingParams, check_request,
                                  read_lazily)


class EngineProcess:
    """An `Engine` over `run` (`Engine.from_run(run, **engine_kw)`) in a child process, with
    `threads` torch threads there. Returns once the model is loaded; a failure to load raises
    the child's own exception (e.g. CheckpointError) with its traceback as a note (one that is
    no Exception, a SystemExit, as an EngineProcessDied naming it)."""

    def __init__(self, run: str, *, threads: int | None = None, **engine_kw):
        ours, theirs = socket.socketpair()
        # The replica's own import path, in its order (a Ray worker's includes a job's working_dir),
        # and nothing before it: -P, else `-m` puts the current directory first, and whatever
        # sits there (anyone's torch.py, another raylm checkout) ran in the engine process.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        with theirs:
            self._proc = subprocess.Popen([sys.executable, "-P", "-m", "raylm.serve.engine_process",
                                           str(theirs.fileno())],
                                          pass_fds=(theirs.fileno(),), env=env)
        self._conn = Connection(ours.detach())
        self._conn.send((run, threads, engine_kw))
        try:
            msg = self._conn.recv()
        except EOFError:
            raise EngineProcessDied(f"the engine process exited with code {self._proc.wait()} "
                                    "before its model was loaded (its output is above)") from None
        if msg[0] == "error":
            _, error, tb = msg
            self._proc.wait()
            if not isinstance(error, Exception):
                # SystemExit, KeyboardInterrupt: re-raised here, it ended the replica itself,
                # without a word of why (Ray takes a SystemExit for an actor's intended exit).
                error = EngineProcessDied(f"the engine process stopped while loading its model: "
                                          f"{''.join(traceback.format_exception_only(error)).strip()}")
            error.add_note(f"in the engine process:\n{tb}")
            raise error
        info = msg[1]
        self.tokenizer = info["tokenizer"]
        self.max_seq_len: int = info["max_seq_len"]
        self.vocab_size: int = info["vocab_size"]
        self.meta: dict = info["meta"]
        self._stats: dict = info["stats"]
        self._keys = itertools.count()
        self._outputs: dict[int, Outputs] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._closed: asyncio.Future | None = None
        self._dead: str | None = None  # why the process is gone, once it is
        self._ping_sent: float | None = None  # when the ping not yet answered went out (monotonic)
        try:  # on the replica's event loop (Serve builds replicas there): its answers are read from now
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            self._attach()

    # ------------------------------------------------------------------ Engine's interface

    def check(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        check_request(prompt_ids, params, self.vocab_size, self.max_seq_len)

    def stats(self) -> dict:
        """The engine's counters as of its latest message (at most one step old), and its pid."""
        return {**self._stats, "engine_pid": self._proc.pid}

    def alive(self) -> bool:
        return self._dead is None and self._proc.poll() is None

    def kill(self) -> None:
        """End the process now (SIGKILL): one that hangs would not see its socket close when
        the replica goes, and would keep its memory for good. The reader fails its requests."""
        self._proc.kill()

    def unanswered_s(self) -> float:
        """For how long the engine process has left a ping unanswered (0.0: it answered the
        last one, and a new one goes out now): a process that is there but hung (stopped,
        stuck in a C call that holds the GIL) answers nothing, and `alive` does not see it.
        From any thread: the ping is sent on the replica's event loop, which reads the answer
        (an event loop that hangs leaves it unanswered too). 0.0 before an event loop reads
        the socket, and once the process is gone (`alive` says so)."""
        loop = self._loop
        if loop is None or self._dead is not None:
            return 0.0
        sent = self._ping_sent
        if sent is not None:
            return time.monotonic() - sent
        self._ping_sent = time.monotonic()
        try:
            loop.call_soon_threadsafe(self._send, ("ping",))
        except RuntimeError:  # the event loop is closed: nobody reads the answer
            self._ping_sent = None
        return 0.0

    def open(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Outputs:
        """As `Engine.open`: the request is on its way to the engine's process when this returns."""
        self.check(prompt_ids, params)
        if self._closing:
            raise EngineClosed("the engine is shutting down; not accepting requests")
        if self._dead:
            raise EngineProcessDied(self._dead)
        self._attach()
        key = next(self._keys)

        def release(ended: bool) -> None:
            self._outputs.pop(key, None)
            if not ended and self._dead is None:
                self._send(("cancel", key))

        outputs = self._outputs[key] = Outputs(release)
        self._send(("gen", key, list(prompt_ids), params))  # if the process is gone, the reader fails it
        return outputs

    def generate(self, prompt_ids: list[int], params: SamplingParams,
                 request_id: str | None = None) -> AsyncIterator[Output]:
        """As `Engine.generate`."""
        return read_lazily(functools.partial(self.open, prompt_ids, params, request_id))

    async def close(self) -> None:
        """Stop admitting, let every request submitted finish, and end the process."""
        loop = asyncio.get_running_loop()
        if not self._closing:
            self._closing = True
            if self._dead is None:
                self._attach()
                self._closed = loop.create_future()
                self._send(("close",))
        if self._closed is not None:
            await asyncio.shield(self._closed)
        await loop.run_in_executor(None, self._proc.wait)

    # ------------------------------------------------------------------ the replica's side of the socket

    def _attach(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            loop.add_reader(self._conn.fileno(), self._readable)
        elif loop is not self._loop:
            raise RuntimeError("EngineProcess serves one event loop; it was first used from another")

    def _send(self, msg) -> None:
        try:
            self._conn.send(msg)
        except OSError:  # the process is gone: the reader reports it
            pass

    def _readable(self) -> None:
        try:
            while self._conn.poll():
                msg = self._conn.recv()
                kind = msg[0]
                if kind == "out":
                    for key, item in msg[1]:
                        outputs = self._outputs.get(key)
                        if outputs is not None:
                            outputs.put_nowait(item)
                self._stats = msg[-1]
                if kind == "pong":
                    self._ping_sent = None
                if kind == "closed" and self._closed is not None and not self._closed.done():
                    self._closed.set_result(None)
        except (EOFError, OSError):
            self._lost()

    def _lost(self) -> None:
        """The socket closed: the process ended (closed, or died). Fail what waits on it."""
        self._loop.remove_reader(self._conn.fileno())
        try:
            code = self._proc.wait(timeout=10)  # its socket is closed: it is exiting
        except subprocess.TimeoutExpired:  # or stuck on its way out, of no use to anyone
            self._proc.kill()
            code = self._proc.wait()
        self._dead = f"the engine process exited with code {code}"
        for outputs in list(self._outputs.values()):  # a listener's ends as it hears this
            outputs.put_nowait(EngineProcessDied(self._dead))
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)


# ---------------------------------------------------------------------------- the engine's process

def _main(fd: int) -> int:
    conn = Connection(fd)

    def fatal(args) -> None:  # a bug on the engine thread: end the process, so the replica is replaced
        traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback)
        sys.stderr.flush()
        os._exit(70)

    threading.excepthook = fatal
    run, threads, engine_kw = conn.recv()
    loaded = threading.Event()

    def orphaned() -> None:
        # The replica sends nothing more until it hears "ready": the socket readable before
        # then is its end closing (it died, or was killed, mid-load). A load can take minutes
        # (or hang on storage): nobody would use the model, and the memory is the next replica's.
        while not loaded.is_set():
            if conn.poll(0.5) and not loaded.is_set():  # poll(2), not select(2): any fd number
                os._exit(1)

    threading.Thread(target=orphaned, name="orphaned", daemon=True).start()
    try:
        import torch

        from raylm.serve.engine import Engine

        if threads:
            torch.set_num_threads(threads)
        engine = Engine.from_run(run, **engine_kw)
    except BaseException as e:  # noqa: BLE001: the replica re-raises it
        conn.send(("error", e, traceback.format_exc()))
        return 1
    lock = threading.Lock()  # the engine thread sends outputs, this thread the rest
    requests: dict = {}  # key -> the engine's request, while it runs
    registry = threading.Lock()  # a request can finish on the engine thread before submit returns here
    sent = [None]  # the (running, waiting) counts the replica last heard

    def send(msg) -> None:
        with lock:
            conn.send(msg)

    def sink(items) -> None:
        with registry:
            for req, item in items:
                if isinstance(item, BaseException) or item.finish_reason is not None:
                    requests.pop(req.id, None)
        stats = engine.stats()
        sent[0] = stats["running"], stats["waiting"]
        send(("out", [(req.id, item) for req, item in items], stats))

    def step_done() -> None:
        stats = engine.stats()
        if (stats["running"], stats["waiting"]) != sent[0]:
            sent[0] = stats["running"], stats["waiting"]
            try:
                send(("stats", stats))
            except OSError:
                pass

    engine.step_done = step_done
    loaded.set()  # before "ready": the replica may send at once
    conn.send(("ready", {"tokenizer": engine.tokenizer, "max_seq_len": engine.max_seq_len,
                         "vocab_size": engine.vocab_size, "meta": engine.meta, "stats": engine.stats()}))
    closing = None  # the thread that closes the engine, once the replica asks

    def close() -> None:
        engine.close_sync()
        try:
            send(("closed", engine.stats()))
        except OSError:  # the replica went meanwhile
            pass

    while True:
        if closing is not None:  # keep hearing cancels while in-flight requests finish
            if not closing.is_alive():
                return 0
            if not conn.poll(0.05):
                continue
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the replica is gone: nobody reads what is in flight
            for req in list(requests.values()):
                engine.cancel(req)
            engine.close_sync()
            return 0
        kind = msg[0]
        if kind == "gen":
            _, key, prompt_ids, params = msg
            try:
                with registry:
                    requests[key] = engine.submit(prompt_ids, params, sink, request_id=key)
            except Exception as e:  # noqa: BLE001: the replica raises it in the request's handler
                send(("out", [(key, e)], engine.stats()))
        elif kind == "cancel":
            with registry:
                req = requests.pop(msg[1], None)
            if req is not None:
                engine.cancel(req)
        elif kind == "ping":  # answered here, not by the engine thread: a long step is no hang
            try:
                send(("pong", engine.stats()))
            except OSError:  # the replica went: the next recv says so
                pass
        elif kind == "close" and closing is None:
            closing = threading.Thread(target=close, name="close")
            closing.start()


if __name__ == "__main__":
    sys.exit(_main(int(sys.argv[1])))
