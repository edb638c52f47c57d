"""The inference server that consumes raw image refs (see ``server`` for the endpoints)."""

from mmref.trainer.inference.api import Choice, GenerateRequest, GenerateResponse, SamplingParams
from mmref.trainer.inference.server import create_app
from mmref.trainer.inference.serving import ServedModel, load_served_model

__all__ = ["Choice", "GenerateRequest", "GenerateResponse", "SamplingParams", "ServedModel", "create_app",
           "load_served_model"]
