"""Frontend end of the engine-core process: start it, send to it, and hear from it.

Sending is thread-safe (one lock around the PUSH socket). Receiving happens on a reader thread
that hands every message to a callback; it also notices a core process that died without a
word (killed, out of memory) and reports it as ``dead``.
"""

from __future__ import annotations

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


class EngineDeadError(RuntimeError):
    """The engine core process is gone; no request can be served any more."""


class EngineCoreClient:
    """Owns the engine-core process and the two sockets to it."""

    def __init__(self, config: EngineConfig, on_message: Callable[[str, Any], None],
                 startup_timeout_s: float = 900.0) -> None:
        self._dir = tempfile.mkdtemp(prefix="minivllm-zmq-")
        input_addr, output_addr = f"ipc://{self._dir}/input", f"ipc://{self._dir}/output"
        self._ctx = zmq.Context()
        self._to_core = self._ctx.socket(zmq.PUSH)
        self._to_core.bind(input_addr)
        self._from_core = self._ctx.socket(zmq.PULL)
        self._from_core.bind(output_addr)
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self.dead_reason: str | None = None
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
                if kind == "dead":
                    raise RuntimeError(f"engine core failed to start:\n{payload}")
            elif not self.proc.is_alive():
                raise RuntimeError(f"engine core process exited during start-up (exit code {self.proc.exitcode})")
        raise RuntimeError(f"engine core did not start within {timeout_s:.0f} s")

    def send(self, kind: str, payload: Any = None) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        with self._send_lock:
            self._to_core.send(pack(kind, payload))

    def _read_loop(self) -> None:
        while not self._stop.is_set():
            if self._from_core.poll(200):
                kind, payload = unpack(self._from_core.recv())
                if kind == "dead":
                    self.dead_reason = f"engine core failed:\n{payload}"
                    self._on_message("dead", self.dead_reason)
                    return
                self._on_message(kind, payload)
            elif not self.proc.is_alive() and not self._stop.is_set():
                self.dead_reason = f"engine core process exited unexpectedly (exit code {self.proc.exitcode})"
                self._on_message("dead", self.dead_reason)
                return

    def shutdown(self) -> None:
        """Stop the core (politely, then by force) and release sockets and files."""
        self._stop.set()
        if self.proc.is_alive():
            try:
                with self._send_lock:
                    self._to_core.send(pack("shutdown"), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            self.proc.join(10)
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
