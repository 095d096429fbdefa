"""Frontend end of the engine-core process: start it, send to it, and hear from it.

Sending is thread-safe (one lock around the PUSH socket) and never blocks: a core that stopped
reading fills its input queue, and then ``send`` raises instead of freezing the caller's event
loop. Receiving happens on a reader thread that hands every message to a callback, notes when
the core was last heard from (the core sends a heartbeat at least every 0.5 s between steps),
and notices a core process that died without a word (killed, out of memory) and reports it as
``dead``. A dead core process is always reaped.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from minivllm.config import EngineConfig
from minivllm.engine.core_proc import run_engine_core
from minivllm.engine.serialization import pack, unpack

logger = logging.getLogger(__name__)

# Messages queued for a core that does not read them before ``send`` gives up.
_SEND_QUEUE_LIMIT = 10_000


class EngineDeadError(RuntimeError):
    """The engine core process is gone; no request can be served any more.

    ``str(e)`` is short and safe to show to clients (no traceback, no paths); ``detail`` holds
    what the operator needs (the core's traceback), which is also logged once.
    """

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


class EngineHungError(EngineDeadError):
    """The engine core has not been heard from within the heartbeat bound.

    Unlike a dead core it may recover (a stopped process continued, a very long step ended);
    requests in flight are left alone.
    """


class EngineCoreClient:
    """Owns the engine-core process and the two sockets to it."""

    def __init__(self, config: EngineConfig, on_message: Callable[[str, Any], None],
                 startup_timeout_s: float = 900.0) -> None:
        self._dir = tempfile.mkdtemp(prefix="minivllm-zmq-")
        input_addr, output_addr = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
        self._ctx = zmq.Context()
        self._to_core = self._ctx.socket(zmq.PUSH)
        self._to_core.setsockopt(zmq.SNDHWM, _SEND_QUEUE_LIMIT)
        self._to_core.bind(input_addr)
        self._from_core = self._ctx.socket(zmq.PULL)
        self._from_core.bind(output_addr)
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self.dead_reason: str | None = None  # short, for clients
        self.dead_detail: str | None = None  # the core's traceback, for the log
        self.last_heard: float = time.monotonic()
        # spawn, not fork: a forked child cannot use CUDA initialised in the parent.
        self.proc = multiprocessing.get_context("spawn").Process(
            target=run_engine_core, args=(config, input_addr, output_addr), daemon=True,
            name="minivllm-engine-core")
        self.proc.start()
        try:
            self.info = self._wait_ready(startup_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.last_heard = time.monotonic()
        self._on_message = on_message
        self._reader = threading.Thread(target=self._read_loop, name="minivllm-core-reader",
                                        daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._from_core.poll(100):
                kind, payload = unpack(self._from_core.recv())
                if kind == "ready":
                    return payload
                if kind == "dead":  # start-up failures go to the developer, traceback and all
                    raise RuntimeError(f"engine core failed to start:\n{payload['traceback']}")
            elif not self.proc.is_alive():
                raise RuntimeError(f"engine core process exited during start-up (exit code {self.proc.exitcode})")
        raise RuntimeError(f"engine core did not start within {timeout_s:.0f} s")

    # ---- state ------------------------------------------------------------------------------
    def seconds_since_heard(self) -> float:
        """Seconds since the last message from the core (any message, heartbeats included)."""
        return time.monotonic() - self.last_heard

    def dead_error(self) -> EngineDeadError | None:
        """The error to raise for a dead core, or None while it lives."""
        if self.dead_reason is None:
            return None
        return EngineDeadError(self.dead_reason, self.dead_detail)

    # ---- sending ----------------------------------------------------------------------------
    def send(self, kind: str, payload: Any = None) -> None:
        """Queue a message for the core.

        Raises:
            EngineDeadError: the core is dead.
            EngineHungError: the core has stopped reading and its input queue is full.
        """
        err = self.dead_error()
        if err is not None:
            raise err
        try:
            with self._send_lock:
                self._to_core.send(pack(kind, payload), flags=zmq.NOBLOCK)
        except zmq.Again:
            raise EngineHungError(f"the engine core is not reading its input "
                                  f"({_SEND_QUEUE_LIMIT} messages queued)") from None

    # ---- receiving (reader thread) ----------------------------------------------------------
    def _read_loop(self) -> None:
        while not self._stop.is_set():
            if self._from_core.poll(200):
                kind, payload = unpack(self._from_core.recv())
                self.last_heard = time.monotonic()
                if kind == "heartbeat":
                    continue
                if kind == "dead":
                    error_type = payload.get("error_type", "error") if isinstance(payload, dict) else "error"
                    detail = payload.get("traceback") if isinstance(payload, dict) else str(payload)
                    logger.error("engine core failed:\n%s", detail)
                    self._declare_dead(f"engine core failed ({error_type})", detail)
                    return
                try:
                    self._on_message(kind, payload)
                except Exception:
                    # The frontend's view of its requests is now unreliable; failing everything
                    # loudly beats streams that silently never end.
                    logger.exception("handling a %r message from the engine core failed", kind)
                    self.proc.kill()
                    self._declare_dead("the frontend failed to process engine output", None)
                    return
            elif not self.proc.is_alive() and not self._stop.is_set():  # is_alive() reaps it
                self._declare_dead(f"engine core process exited unexpectedly (exit code "
                                   f"{self.proc.exitcode})", None)
                return

    def _declare_dead(self, reason: str, detail: str | None) -> None:
        self.dead_reason, self.dead_detail = reason, detail
        try:
            self._on_message("dead", reason)
        finally:
            self._reap()

    def _reap(self, timeout_s: float = 5.0) -> None:
        """Wait for a core that reported its death to exit (kill it if it does not): a dead
        child must not stay behind as a zombie."""
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout_s)

    # ---- shutdown ---------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop the core (politely, then by force) and release sockets and files."""
        self._stop.set()
        if self.proc.is_alive():
            try:
                with self._send_lock:
                    self._to_core.send(pack("shutdown"), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            # A core that has not been heard from for a while (stopped, hung) cannot answer.
            self.proc.join(10 if self.seconds_since_heard() < 5 else 0.5)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
        reader = getattr(self, "_reader", None)
        if reader is not None and reader is not threading.current_thread():
            reader.join(2)
        self._to_core.close(linger=0)
        self._from_core.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
