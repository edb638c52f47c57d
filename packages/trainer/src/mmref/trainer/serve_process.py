"""``mmref serve`` as a child process (its own session) on this machine: the inference server of a run.

    with ServeProcess(model_dir, store, log_path, engine="vllm") as server:
        ...  # server.url answers like any `mmref serve`; stopped (and waited for) on exit, also on error

``mmref rl`` starts one for ``inference.process = "child"`` (``child_server``: its flags from
the run config); the remote-inference tests start them by hand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import httpx

from mmref.trainer.errors import InferenceStartError
from mmref.trainer.inference.threaded import free_port
from mmref.trainer.run_config import InferenceConfig, ModelConfig


class ServeProcess:
    """``python -m mmref.trainer.cli serve --model DIR`` on ``host:port`` (0: a free one), output to ``log``.

    ``flags``: more ``mmref serve`` flags (``serve_flags``).
    """

    def __init__(self, model: str | Path, store: str | Path, log: Path, engine: str = "transformers",
                 device: str = "cpu", startup_s: float = 600.0, flags: Sequence[str] = (), host: str = "127.0.0.1",
                 port: int = 0) -> None:
        port = port or free_port(host)
        self.url = f"http://{host}:{port}"
        self.log, self.startup_s = log, startup_s
        self._out: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "mmref.trainer.cli", "serve", "--model", str(model),
                                      "--store", str(store), "--host", host, "--port", str(port),
                                      "--engine", engine, "--device", device, *flags],
                                     stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self) -> ServeProcess:
        """Block until ``GET /health`` answers; ``InferenceStartError`` with the log's tail if it exits or times out."""
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise InferenceStartError(f"mmref serve exited with code {self.proc.returncode} "
                                          f"(log {self.log}): {self._tail()}")
            try:
                httpx.get(f"{self.url}/health", timeout=1).raise_for_status()
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise InferenceStartError(f"mmref serve did not answer within {self.startup_s:.0f}s (log {self.log}): "
                                  f"{self._tail()}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        """End the server and every process it started (its own session: vLLM's engine core and workers)."""
        if self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _signal_group(self.proc.pid, signal.SIGKILL)  # whatever outlived the server
        deadline = time.monotonic() + 10
        while group_alive(self.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._out.close()

    def __enter__(self) -> ServeProcess:
        try:
            return self.wait()
        except BaseException:  # a server that never came up is still stopped (no orphan)
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _tail(self, lines: int = 20) -> str:
        self._out.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def group_alive(pgid: int) -> bool:
    """Whether a process of process group ``pgid`` still runs (a zombie, already dead, does not count)."""
    if not Path("/proc/self/stat").exists():  # not Linux: any member, zombies too
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):  # gone while listed
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # nothing left in it
        pass


def serve_flags(inference: InferenceConfig, model: ModelConfig, dtype: str) -> list[str]:
    """The ``mmref serve`` flags of a run's server: the model's pixel limits, ``dtype`` and the server keys set."""
    values = {"min_pixels": model.min_pixels, "max_pixels": model.max_pixels, "dtype": dtype,
              "max_model_len": inference.max_model_len, "gpu_memory_utilization": inference.gpu_memory_utilization,
              "tensor_parallel_size": inference.tensor_parallel_size}
    return [arg for key, value in values.items() if value is not None
            for arg in (f"--{key.replace('_', '-')}", str(value))]


def child_server(model_dir: Path, store: str | Path, run_dir: Path, inference: InferenceConfig, model: ModelConfig,
                 device: str, dtype: str) -> ServeProcess:
    """The run's own ``mmref serve`` on ``inference.host``/``port`` (not yet waited for), its output in
    ``<run_dir>/inference.log``."""
    return ServeProcess(model_dir, store, run_dir / "inference.log", engine=inference.engine, device=device,
                        flags=serve_flags(inference, model, dtype), host=inference.host, port=inference.port)
