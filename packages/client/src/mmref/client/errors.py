"""Errors raised by mmref.client::

    MMRefError (mmref.renderers.errors)
     └── ClientError
          ├── ImageInputError (ValueError)      an image in a request that cannot become a ref
          ├── TraceError (ValueError)           a trace that breaks its invariants
          ├── EnvError                          an environment that cannot be loaded or that failed
          │    ├── EnvLoadError (ValueError)     a name, import path, entry point or factory that yields no environment
          │    ├── EnvFailedError                an environment raised inside a rollout (the rollout is dropped)
          │    ├── DatasetError (ValueError)     dataset rows, columns, images or prompt template that do not fit
          │    └── RewardFunctionError           a reward function that cannot be imported, or raised
          └── InferenceError                    the inference server refused or failed
               ├── InferenceRequestError        4xx: never retried, carries the server's message
               └── InferenceUnavailableError    connection errors / 5xx after bounded retries
"""

from __future__ import annotations

from mmref.renderers.errors import MMRefError


class ClientError(MMRefError):
    """Base of client errors."""


class ImageInputError(ClientError, ValueError):
    """An image in a request body that cannot become a store ref (the message never holds its bytes)."""


class TraceError(ClientError, ValueError):
    """A trace whose nodes, slots or masks break the trace invariants."""


class EnvError(ClientError):
    """Base of environment errors."""


class EnvLoadError(EnvError, ValueError):
    """An ``env.name`` that is no built-in, importable factory or entry point, or a factory that failed."""


class EnvFailedError(EnvError):
    """An environment's ``reset``/``step``/``close`` raised during a rollout; ``__cause__`` is the original error."""


class DatasetError(EnvError, ValueError):
    """Dataset rows that do not fit the dataset environment's settings (missing column, bad image, template)."""


class RewardFunctionError(EnvError):
    """A reward function that cannot be imported, or that raised while scoring."""


class InferenceError(ClientError):
    """The inference server did not produce a completion."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class InferenceRequestError(InferenceError, ValueError):
    """The server refused the request (4xx); retrying cannot help."""


class InferenceUnavailableError(InferenceError, ConnectionError):
    """The server was unreachable or failing (connect errors, 5xx) after the bounded retries."""


class InferenceServerError(InferenceError):
    """The server failed on this request (HTTP 5xx other than 502/503/504); an upstream fault, not the caller's."""
