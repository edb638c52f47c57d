"""The interception server ``mmref rl`` and ``mmref eval`` host for agent environments.

    with host_agents(renderer, store, inference_url, "tiny-qwen2.5-vl") as host:
        batch = await play_agent_groups(agent, seeds, ids, group_size, host)

Each rollout gets its own session URL (``host.session_url``); the server renders and
bridges its calls against the inference server and records them as traces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from mmref.client.agent import InterceptionHost
from mmref.client.interception import create_interception_app
from mmref.client.train_client import TrainClient
from mmref.renderers.store import ImageStore
from mmref.trainer.inference.threaded import serve_in_thread


@contextlib.contextmanager
def host_agents(renderer: Any, store: ImageStore, inference_url: str, model: str, host: str = "127.0.0.1",
                max_connections: int = 64) -> Iterator[InterceptionHost]:
    """Serve the interception app on a free loopback port for the ``with`` block."""
    client = TrainClient(inference_url, max_connections=max_connections)
    app = create_interception_app(renderer, client, store, model_name=model)
    with serve_in_thread(app, host, 0) as url:
        yield InterceptionHost(app, url, renderer, model, client)
