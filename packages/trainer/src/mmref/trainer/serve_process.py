"""``mmref serve`` as a child process on a free port: the inference node of a remote run, on one machine.

    with ServeProcess(model_dir, store, log_path, engine="vllm") as server:
        run_rl(config.model_copy(...inference.url = server.url...))

Used by the GPU smoke run (a vLLM server beside the trainer) and the remote-inference tests.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

from mmref.trainer.inference.threaded import free_port


class ServeProcess:
    """``python -m mmref.trainer.cli serve --model DIR`` on ``127.0.0.1:<free port>``, output to ``log``."""

    def __init__(self, model: str | Path, store: str | Path, log: Path, engine: str = "transformers",
                 device: str = "cpu", startup_s: float = 600.0) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log, self.startup_s = log, startup_s
        self._out: IO[bytes] = log.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "mmref.trainer.cli", "serve", "--model", str(model),
                                      "--store", str(store), "--port", self.url.rsplit(":", 1)[1],
                                      "--engine", engine, "--device", device],
                                     stdout=self._out, stderr=subprocess.STDOUT)

    def wait(self) -> ServeProcess:
        """Block until ``GET /health`` answers; ``RuntimeError`` with the log's tail if it exits or times out."""
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mmref serve exited with code {self.proc.returncode}: {self._tail()}")
            try:
                httpx.get(f"{self.url}/health", timeout=1).raise_for_status()
                return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"mmref serve did not answer within {self.startup_s:.0f}s: {self._tail()}")

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()

    def __enter__(self) -> ServeProcess:
        return self.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _tail(self, lines: int = 20) -> str:
        self._out.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
