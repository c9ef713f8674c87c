"""Stopping raylm: SIGTERM is Ctrl-C (`stop_on_sigterm`), and both wait while Ray's cluster
starts (`InterruptsHeld`), so that a stop never leaves half a cluster behind."""

from __future__ import annotations

import os
import signal
import threading


def stop_on_sigterm() -> None:
    """SIGTERM (Kubernetes stopping a pod, `ray job stop`, `kill`) stops this process as Ctrl-C
    does: workers stopped, the lock let go, `raylm: interrupted`. Ray's driver handler, which
    ray.init puts in, printed a C++ stack dump and aborted with a checkpoint in flight.
    Main thread only (Python takes signal handlers there alone)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame) -> None:
    if callable(signal.getsignal(signal.SIGINT)):
        signal.raise_signal(signal.SIGINT)  # whatever handles Ctrl-C now: Ray Train's stops its workers
    else:  # Ctrl-C ignored (a background job of a script starts so) or the system's: not SIGTERM
        raise KeyboardInterrupt


class InterruptsHeld:
    """Ctrl-C and SIGTERM held while `init_ray` starts (or joins) the cluster, and acted on
    once it is done: `ray.shutdown()`, then KeyboardInterrupt. Raised inside ray.init, an
    interrupt stopped it half-way, and Ray's agents (ray::DashboardAgent, ray::RuntimeEnvAgent),
    still starting, outlived their raylet (Ray's own gap: they watch it only once started); it
    was lost where it landed in one of the at-fork hooks that run as Ray starts each of its
    processes (Python printed "Exception ignored in: <function _releaseLock>", and the run
    went on to train); and raised in the imports of ray.init or of Ray Data (which another
    thread imports meanwhile: `beside_ray_start`), it could leave Python's import lock taken,
    and the process hung instead of stopping. A second one stops at once, for a start that
    hangs. SIGTERM is Ctrl-C here too: Ray's own handlers, which ray.init puts in, are
    left out while it runs (they exited with status 15 or 1, without a word); `stop_on_sigterm`
    puts raylm's back after it. Ctrl-C stays ignored where it was. Main thread only."""

    def __init__(self, ray):
        self.ray, self.received, self.saved = ray, 0, None

    def _received(self, signum, frame) -> None:
        self.received += 1
        if self.received > 1:
            raise KeyboardInterrupt
        try:  # os.write: print() here may land inside a print of the main thread's
            os.write(2, b"raylm: stopping once Ray's cluster has started (again to stop at once)\n")
        except OSError:
            pass

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        sigint = signal.getsignal(signal.SIGINT)
        utils = getattr(getattr(self.ray, "_private", None), "utils", None)
        self.saved = (signal.signal(signal.SIGINT, self._received) if callable(sigint) else None,
                      signal.signal(signal.SIGTERM, self._received), utils, getattr(utils, "set_sigterm_handler", None))
        if self.saved[3] is not None:
            utils.set_sigterm_handler = lambda handler: None
        return self

    def __exit__(self, kind, exc, tb) -> None:
        if self.saved is None:
            return
        sigint, sigterm, utils, set_sigterm_handler = self.saved
        if set_sigterm_handler is not None:
            utils.set_sigterm_handler = set_sigterm_handler
        signal.signal(signal.SIGTERM, sigterm)
        if sigint is not None:
            signal.signal(signal.SIGINT, sigint)
        if self.received:
            if self.ray.is_initialized():
                self.ray.shutdown()
            raise KeyboardInterrupt from exc
