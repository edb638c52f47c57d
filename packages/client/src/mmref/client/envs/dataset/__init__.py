"""The built-in dataset environment (``env.name = "dataset"``): rows of images, a prompt and an answer.

See ``source`` for its settings, ``rewards`` for reward functions and ``rows`` for image columns.
"""

from mmref.client.envs.dataset.episode import DatasetEpisode
from mmref.client.envs.dataset.order import DataOrder, DatasetExhaustedError
from mmref.client.envs.dataset.source import DatasetConfig, DatasetSource, dataset

__all__ = ["DataOrder", "DatasetConfig", "DatasetEpisode", "DatasetExhaustedError", "DatasetSource", "dataset"]
