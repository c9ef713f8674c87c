"""Which of a training worker's failures Ray Train's console report ("Error in training
function" and its traceback) leaves out: only a collective whose peer's process died (the
driver's one line names that rank: tests/integration/test_killed_worker_report.py). A worker's
own error, raylm's bug among them, keeps its traceback."""

from __future__ import annotations

import io
import logging

from raylm.train_ray import _QuietPeerDeath

GLOO = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:64738. "
        "This is typically caused by a remote worker crashing.")


def console_says(error: BaseException) -> str:
    """What a console handler with the filter prints as Ray Train reports `error` (from inside
    its `except` block, without attaching the exception, as Ray 2.60 does)."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(_QuietPeerDeath())
    logger = logging.getLogger("test_worker_death_output")
    logger.addHandler(handler)
    try:
        try:
            raise error
        except BaseException:
            logger.error("Error in training function:\nTraceback (most recent call last): ...")
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


def test_a_collective_that_lost_its_peer_is_left_to_the_drivers_line():
    assert console_says(RuntimeError(GLOO)) == ""
    try:
        raise RuntimeError(GLOO.replace("closed", "reset"))
    except RuntimeError as e:
        wrapped = OSError("checkpoint barrier failed")
        wrapped.__cause__ = e
    assert console_says(wrapped) == ""


def test_a_workers_own_error_keeps_its_traceback():
    for error in (ValueError("shape mismatch"), RuntimeError("CUDA error: device-side assert triggered"),
                  KeyError("Connection closed by peer")):
        assert "Traceback" in console_says(error), error
