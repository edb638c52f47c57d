"""``mmref sft``: a supervised warm start in processed mode, loadable by ``mmref rl`` (``model.path``).

Demonstrations come from the run's environment (``[env]``, loaded as ``mmref rl`` loads it):
each episode is played with the right answer every turn, which its episodes give as
``answer()`` (color-codeword's codeword, the dataset environment's answer column). Conversations are rendered with their pixels (``render_processed``: the
real image processor, in this process) and the model is trained with cross-entropy on the
assistant turns. The checkpoint lands in ``<output_dir>/checkpoints/sft``, a model directory
(weights, config, tokenizer, processor config, chat template) that ``model.path`` loads.

    uv run mmref sft examples/color-codeword.toml --max-steps 30 --output-dir runs/sft
    uv run mmref rl examples/color-codeword.toml --set model.path=runs/sft/checkpoints/sft
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from mmref.client.agent import is_agent
from mmref.client.environment import Environment, image_root_of, reset_env, step_env, vocabulary_of
from mmref.client.errors import EnvLoadError
from mmref.client.images import prepare_images
from mmref.renderers import ImageStore
from mmref.renderers.processed import render_processed
from mmref.renderers.render import create_renderer
from mmref.renderers.render.base import ParsedResponse
from mmref.trainer.environments import run_environment
from mmref.trainer.export import export_model_dir
from mmref.trainer.lr_schedule import build_scheduler
from mmref.trainer.policy_setup import build_policy
from mmref.trainer.resume import open_run_files
from mmref.trainer.run_config import RunConfig


async def demonstration(env: Environment) -> list[dict[str, Any]]:
    """One episode answered right (``env.answer()``) at every turn, as chat messages."""
    if not callable(getattr(env, "answer", None)):
        raise EnvLoadError(f"mmref sft needs episodes that know the right reply: {type(env).__name__} has no "
                           "answer() method")
    messages = await reset_env(env)
    done = False
    while not done:
        answer = str(env.answer())
        new, _, done = await step_env(env, ParsedResponse(answer))
        messages = messages + [{"role": "assistant", "content": answer}] + new
    return messages


def assistant_mask(tokens: Any, messages: list[dict[str, Any]], end_token_id: int) -> torch.Tensor:
    """(L,) True on each assistant turn's content and its closing token: what SFT learns to produce."""
    mask = [index >= 0 and messages[index]["role"] == "assistant" and (content or token == end_token_id)
            for index, content, token in zip(tokens.message_index, tokens.is_content, tokens.token_ids)]
    return torch.tensor(mask)


def run_sft(config: RunConfig, console: Console | None = None) -> Path:
    """Train ``config.max_steps`` steps of ``config.rollout.prompts_per_step`` demonstrations; return the checkpoint."""
    console = console or Console()
    run_dir = Path(config.output_dir)
    metrics = run_dir / "sft_metrics.jsonl"
    open_run_files(run_dir, (metrics,), "new", resumable=False)  # never over an earlier run's records
    source = run_environment(config)
    if is_agent(source):
        raise EnvLoadError(f"env {config.env.name!r} is agent code: mmref sft needs episodes that know their answer")
    torch.manual_seed(config.seed)
    policy = build_policy(config, vocabulary_of(source))
    model, spec, processor = policy.model, policy.spec, policy.processor
    renderer = create_renderer(policy.tokenizer, policy.family, spec=spec)
    store = ImageStore(run_dir / "store")
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.lr)
    scheduler = build_scheduler(optimizer, total_steps=config.max_steps, warmup_steps=config.train.warmup_steps,
                                decay=config.train.lr_decay, min_ratio=config.train.min_lr_ratio)
    end_id = renderer.stop_token_ids[0]
    model.train()
    for step in range(config.max_steps):
        start, losses = time.perf_counter(), []
        for episode in range(config.rollout.prompts_per_step):
            env = source.episode(step * 10_000 + episode)
            messages, _ = prepare_images(asyncio.run(demonstration(env)), store, spec, image_root_of(env))
            processed = render_processed(renderer, messages, store, add_generation_prompt=False,
                                         image_processor=processor)
            ids = torch.tensor([processed.tokens.token_ids])
            logits = model(input_ids=ids, pixel_values=processed.pixel_values, image_grid_thw=processed.image_grid_thw,
                           mm_token_type_ids=torch.tensor([processed.tokens.mm_token_type_ids]), use_cache=False).logits
            targets = assistant_mask(processed.tokens, messages, end_id)[1:]
            loss = torch.nn.functional.cross_entropy(logits[0, :-1][targets], ids[0, 1:][targets])
            (loss / config.rollout.prompts_per_step).backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step, "loss": sum(losses) / len(losses), "lr": lr, "step_s": time.perf_counter() - start}
        with metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
        console.print(f"sft step {step + 1}/{config.max_steps} loss {record['loss']:.3f}")
    path = export_model_dir(model.eval(), policy.tokenizer, processor, run_dir / "checkpoints" / "sft")
    console.print(f"sft checkpoint: {path}  (warm-start rl with --set model.path={path})")
    return path
