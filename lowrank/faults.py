"""Named fault-injection points for the fault suite (tests/compress/test_faults.py); inert unless asked for.

``LOWRANK_FAULT=NAME[=ACTION][,NAME[=ACTION]...]`` makes ``fault_point(NAME)`` act, once per process:

- ``stall`` (the default): print ``fault point NAME`` on stdout, then wait until a SIGINT arrives
  (at most ``LOWRANK_FAULT_SECONDS``, default 300). The SIGINT goes on to whatever handler was in
  place, so it has the effect a Ctrl-C at that point would have; a test can also SIGKILL meanwhile.
- ``enospc``: raise ``OSError(ENOSPC)``, what a full disk does to a write there.

The points: ``calibrate`` (first calibration batch), ``acip:step`` (an ACIP training step),
``materialize`` (after the first layer of a plan is replaced), ``save:written`` (a checkpoint's files
are in its temporary directory) and ``save:swap`` (just before that directory is renamed into place).
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time

__all__ = ["fault_point"]

ENV = "LOWRANK_FAULT"
_acted: set[str] = set()


def _requested(name: str) -> str | None:
    for item in os.environ.get(ENV, "").split(","):
        key, _, action = item.strip().partition("=")
        if key == name:
            return action or "stall"
    return None


def fault_point(name: str) -> None:
    """Act as ``LOWRANK_FAULT`` asks at the point `name` (see the module docstring); else do nothing."""
    if ENV not in os.environ or name in _acted:
        return
    action = _requested(name)
    if action is None:
        return
    _acted.add(name)
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if action != "stall":
        raise ValueError(f"{ENV}: unknown action {action!r} for {name!r} (stall or enospc)")
    print(f"fault point {name}", flush=True)
    _wait_for_sigint(float(os.environ.get("LOWRANK_FAULT_SECONDS", "300")))


def _wait_for_sigint(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    arrived = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None

    def handler(signum, frame):
        arrived.set()
        if callable(previous):
            previous(signum, frame)  # e.g. Python's KeyboardInterrupt, or ACIP's deferred stop

    if main:
        signal.signal(signal.SIGINT, handler)
    try:
        while not arrived.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
