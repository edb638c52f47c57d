"""Errors raised by mmref.trainer.

Each names the image (asset, sha256), the expected and actual values, and the stage::

    MMRefError (mmref.renderers.errors)
     └── TrainerError
          ├── SampleError (ValueError)          a sample whose slots or lengths are inconsistent
          ├── PackingError (ValueError)         a sample that cannot be placed in a row
          ├── MissingImageError (FileNotFoundError)  a ref whose bytes this rank cannot read
          ├── ImageTokenMismatchError (ValueError)   pad tokens vs features the grids produce
          ├── RankFailedError (RuntimeError)    another rank of the job failed (see distributed)
          ├── ModelDirError (ValueError)        a model directory that cannot be trained or served (see policy)
          │    ├── IncompleteModelDirError (FileNotFoundError)  no config.json, weights, tokenizer or processor config
          │    ├── UnsupportedModelError                       a model_type with no trainable mmref family
          │    ├── ProcessorConfigError                        a processor config the layout math cannot reproduce
          │    └── ServedModelMismatchError                    a remote server serving another model (see remote)
          ├── InferenceUnreachableError (ConnectionError)  inference.url does not answer as an mmref server
          ├── InferenceStartError (RuntimeError)  the child `mmref serve` of a run exited or never answered
          ├── RunDirError (ValueError)          a new run into a directory with an earlier run's records (see resume)
          ├── ResumeError (ValueError)          no saved state to resume, or one saved by another run's config
          └── TransportError (RuntimeError)     the micro-batch transport (see transport)
               ├── ReadyTimeoutError (TimeoutError)    ranks that never sent READY; names them
               ├── ReceiveTimeoutError (TimeoutError)  no micro-batches within the receive timeout
               └── StepMismatchError                   a step tag that is not the expected one
"""

from __future__ import annotations

from mmref.renderers.errors import MMRefError


class TrainerError(MMRefError):
    """Base of trainer errors."""


class SampleError(TrainerError, ValueError):
    """A training sample whose token ids, masks or image slots disagree."""


class PackingError(TrainerError, ValueError):
    """A sample that cannot be placed in a row of the configured length."""


class MissingImageError(TrainerError, FileNotFoundError):
    """Image bytes a trainer rank cannot read under the ``error`` missing-image policy."""


class ImageTokenMismatchError(TrainerError, ValueError):
    """Image-pad tokens that do not match the features the image grids will produce."""


class RankFailedError(TrainerError, RuntimeError):
    """A distributed job stopped because some rank failed; the message names the rank and cause."""


class ModelDirError(TrainerError, ValueError):
    """A model directory that cannot be trained or served; a user error (the CLI exits 2 with its message)."""


class IncompleteModelDirError(ModelDirError, FileNotFoundError):
    """A model directory without one of its parts: config, weights, tokenizer, image processor config."""


class UnsupportedModelError(ModelDirError):
    """A model directory whose ``model_type`` has no layout family mmref can train."""


class ProcessorConfigError(ModelDirError):
    """An image processor config whose resize and pixel rules the layout math cannot reproduce."""


class RunDirError(TrainerError, ValueError):
    """An output directory that already holds a run's records, for a run not asked to resume; a user error."""


class ResumeError(TrainerError, ValueError):
    """A resume with no saved state, a state of another run (model, env, seed) or no steps left; a user error."""


class TransportError(TrainerError, RuntimeError):
    """The micro-batch transport between the packer and the trainer ranks failed."""


class ReadyTimeoutError(TransportError, TimeoutError):
    """Some ranks did not connect and send READY within the timeout; the message lists them."""


class ReceiveTimeoutError(TransportError, TimeoutError):
    """A rank waited longer than its receive timeout for its micro-batches."""


class StepMismatchError(TransportError):
    """A message whose step tag is not the one the rank expected (a gap or a stale step)."""


class TrainerJobError(TrainerError, RuntimeError):
    """The torchrun trainer ranks of a run exited or stopped answering (the message has their log's tail)."""


class ServedModelMismatchError(ModelDirError):
    """A remote inference server whose model (fingerprint, identity, engine, version) is not the run's."""


class InferenceUnreachableError(TrainerError, ConnectionError):
    """``inference.url`` does not answer ``GET /v1/models`` as an mmref inference server."""


class InferenceStartError(TrainerError, RuntimeError):
    """The run's child ``mmref serve`` (``inference.process = "child"``) exited or never answered (log tail)."""
