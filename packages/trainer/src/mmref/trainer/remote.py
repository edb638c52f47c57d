"""A ``mmref serve`` in another process as the rollouts' server (``inference.url``, or the run's child
server), checked before the run uses it.

The server must serve the run's model directory: the same layout fingerprint (refs would be
refused otherwise), the same ``model_identity`` (config, tokenizer, starting weights), the
requested engine and the starting weight version::

    served = check_remote(url, expected=ExpectedModel(spec.fingerprint, identity, "transformers"))
    served.weight_version   # 0 for a fresh server

Any difference is one ``ServedModelMismatchError`` line naming the field, both values and the
fix; a server that does not answer is an ``InferenceUnreachableError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx

from mmref.renderers import ImageStore
from mmref.trainer.errors import InferenceUnreachableError, ServedModelMismatchError
from mmref.trainer.inference.server import create_app
from mmref.trainer.inference.serving import ServedModel
from mmref.trainer.inference.threaded import serve_in_thread
from mmref.trainer.run_config import InferenceConfig
from mmref.trainer.serve_process import ServeProcess


@dataclass(frozen=True)
class ExpectedModel:
    """What the run trains: the served model must match each field."""

    fingerprint: str
    identity: str
    engine: str
    weight_version: int = 0


@dataclass(frozen=True)
class RemoteModel:
    """The model ``GET /v1/models`` at ``url`` reports."""

    url: str
    name: str
    family: str
    fingerprint: str
    identity: str
    engine: str
    weight_version: int


def fetch_remote(url: str, timeout_s: float = 30.0) -> RemoteModel:
    """The served model at ``url``; ``InferenceUnreachableError`` if it is not an mmref server."""
    try:
        response = httpx.get(f"{url.rstrip('/')}/v1/models", timeout=timeout_s)
        response.raise_for_status()
        card = response.json()["data"][0]
        return RemoteModel(url.rstrip("/"), card["id"], card["family"], card["fingerprint"], card.get("identity", ""),
                           card.get("engine", "transformers"), int(card["weight_version"]))
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise InferenceUnreachableError(f"inference.url {url} does not answer GET /v1/models as an mmref server "
                                        f"({type(exc).__name__}: {str(exc)[:200]}); start it with "
                                        "`mmref serve --model DIR --host 0.0.0.0 --store STORE`") from None


def check_remote(url: str, expected: ExpectedModel, timeout_s: float = 30.0) -> RemoteModel:
    """The served model at ``url`` if it is the run's; else ``ServedModelMismatchError`` naming the first difference."""
    served = fetch_remote(url, timeout_s)
    fixes = {"fingerprint": "serve the run's model directory with the run's --min-pixels/--max-pixels",
             "identity": "serve the directory the run trains (model.path), not another model or a step export",
             "engine": "set inference.engine to the server's engine or restart it with --engine",
             "weight_version": "restart `mmref serve` so it holds the model directory's own weights"}
    for field, fix in fixes.items():
        theirs, ours = getattr(served, field), getattr(expected, field)
        if theirs != ours:
            raise ServedModelMismatchError(f"inference server {url} ({served.name}) has {field} {theirs!r} but this "
                                           f"run needs {ours!r}: {fix}")
    return served


class RemoteEngineCounters:
    """The remote engine's cumulative seconds and batches (``GET /health``), read like a local engine's."""

    def __init__(self, url: str, timeout_s: float = 10.0) -> None:
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    @property
    def generate_s(self) -> float:
        return self._counter("generate_s")

    @property
    def batches(self) -> float:
        return self._counter("batches")

    @property
    def load_s(self) -> float:
        return self._counter("load_s")

    def _counter(self, name: str) -> float:
        return float(httpx.get(f"{self.url}/health", timeout=self.timeout_s).json().get(name, 0.0))


@contextlib.contextmanager
def rollout_server(served: ServedModel | None, store: ImageStore, inference: InferenceConfig,
                   expected: ExpectedModel, start_child: Callable[[], ServeProcess] | None = None) -> Iterator[str]:
    """The base URL rollouts call, by ``inference.mode``: ``served`` on a loopback thread ("in_process"),
    ``start_child()``'s server ("child": stopped when the block ends, also on error) or ``inference.url``;
    a server in another process is checked to serve ``expected`` first."""
    if inference.mode == "in_process":
        with serve_in_thread(create_app(served, store), inference.host, inference.port) as url:
            yield url
        return
    if inference.mode == "child":
        with start_child() as child:
            yield check_remote(child.url, expected).url
        return
    yield check_remote(inference.url, expected).url
