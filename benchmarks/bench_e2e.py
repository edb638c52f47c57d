"""Wall time per step of ``mmref rl`` against a bare in-memory loop on the same model, task and batch.

The bare loop is what a single-process script would do: the environment's images go
straight through the image processor, prompts are rendered in full each turn, rollouts
sample in batches with the same engine code in memory, and the update is one padded
forward/backward with the same loss and optimizer. No server, HTTP, store, refs,
validation, packing or materializer. Both run ``STEPS`` steps after one warm-up step;
``mmref rl`` runs synchronously for the comparison (``max_async = 0``: sample, then train)
and once more as shipped (``max_async = 1``: the next batch samples while this one trains).

Prints one JSON line: seconds per step of each, the ratio (target <= 3x) and where the
pipeline's step goes (rollouts: render + HTTP + validation + sampling; materialize;
forward; backward; optimizer; weight sync and bookkeeping).
"""

from __future__ import annotations

import base64
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration-tests"))

from mmref.client.envs.color_codeword import ColorCodewordConfig, ColorCodewordEnv  # noqa: E402
from mmref.renderers import ImageStore  # noqa: E402
from mmref.client.images import prepare_images  # noqa: E402
from mmref.renderers.render import create_renderer  # noqa: E402
from mmref.trainer.inference.api import SamplingParams  # noqa: E402
from mmref.trainer.inference.engine import TransformersEngine, Job  # noqa: E402
from mmref.trainer.logprobs import token_logprobs  # noqa: E402
from mmref.trainer.loss import policy_loss  # noqa: E402
from mmref.trainer.models import build_image_processor, image_token_ids_of  # noqa: E402
from mmref.trainer.pixels import ImageFeatures  # noqa: E402
from mmref.trainer.rl import build_policy, run_rl  # noqa: E402
from mmref.trainer.run_config import RunConfig, load_run_config  # noqa: E402
from mmref.trainer.samples import group_advantages  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


def pil_images(messages: list[dict]) -> list[Image.Image]:
    """The images of the environment's messages (data URLs), decoded in memory."""
    out = []
    for message in messages:
        for part in message.get("content") or []:
            if isinstance(part, dict) and part.get("type") == "image_url":
                payload = part["image_url"]["url"].split(",", 1)[1]
                out.append(Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB"))
    return out


class BareLoop:
    """GRPO on color-codeword in one process, pixels in memory."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.env_config = ColorCodewordConfig(colors=config.env.colors, turns=config.env.turns,
                                              min_side=config.env.min_side, max_side=config.env.max_side,
                                              system_prompt=config.env.system_prompt)
        torch.manual_seed(config.seed)
        self.tokenizer, self.model, spec = build_policy(config, self.env_config.words)
        self.processor = build_image_processor(spec)
        self.renderer = create_renderer(self.tokenizer, config.model.family, spec=spec)
        # Token layout only: the renderer needs refs, so images get an in-memory store (no disk, no HTTP).
        self.scratch = ImageStore("memory://bench-e2e-bare")
        self.banned = image_token_ids_of(self.model)
        self.engine = TransformersEngine(self.model, self.banned, self.renderer.stop_token_ids,
                                         pad_token_id=self.renderer.stop_token_ids[0])
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.train.lr)
        self.sampling = SamplingParams(temperature=config.rollout.temperature, top_p=config.rollout.top_p,
                                       max_tokens=config.rollout.max_tokens)

    def features(self, messages: list[dict]) -> list[ImageFeatures]:
        images = pil_images(messages)
        if not images:
            return []
        out = self.processor(images=images, return_tensors="pt")
        sizes = out["image_grid_thw"].prod(-1).tolist()
        return [ImageFeatures(p, tuple(g)) for p, g in zip(out["pixel_values"].split(sizes), out["image_grid_thw"].tolist())]

    def step(self, seed: int) -> float:
        """One GRPO step; returns its wall seconds."""
        start = time.perf_counter()
        cfg = self.config.rollout
        envs = [ColorCodewordEnv(self.env_config, seed=seed + p) for p in range(cfg.prompts_per_step)
                for _ in range(cfg.group_size)]
        conversations = [env.reset() for env in envs]
        samples: list[tuple[list[int], list[int], list[float], list[ImageFeatures], int]] = []
        rewards = [0.0] * len(envs)
        for _ in range(self.env_config.turns):
            jobs = []
            for messages in conversations:
                refs_messages, _ = prepare_images(messages, self.scratch, self.renderer.spec)
                tokens = self.renderer.render(refs_messages)
                types = [int(t == self.renderer.image_pad_id) for t in tokens.token_ids]
                jobs.append(Job(tokens.token_ids, self.features(messages), types, self.sampling))
            choices = [c for i in range(0, len(jobs), 32) for c in self.engine.generate_batch(jobs[i:i + 32])]
            for index, (env, job, (choice,)) in enumerate(zip(envs, jobs, choices)):
                text = self.renderer.parse_response(choice.token_ids).content
                new, rewards[index], _ = env.step(text)
                samples.append((job.prompt_ids, choice.token_ids, choice.logprobs, list(job.features), index))
                conversations[index] = conversations[index] + [{"role": "assistant", "content": text}] + new
        advantages = [a for g in range(0, len(rewards), cfg.group_size)
                      for a in group_advantages(rewards[g:g + cfg.group_size])]
        self.update(samples, advantages)
        return time.perf_counter() - start

    def update(self, samples, advantages: list[float]) -> None:
        """One right-padded forward/backward over every sample, then an optimizer step."""
        self.model.train()
        width = max(len(p) + len(c) for p, c, *_ in samples)
        ids = torch.zeros((len(samples), width), dtype=torch.long)
        mask, loss_mask = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
        old, adv = torch.zeros(len(samples), width), torch.zeros(len(samples), width)
        for row, (prompt, completion, logprobs, _, episode) in enumerate(samples):
            tokens = prompt + completion
            ids[row, :len(tokens)] = torch.tensor(tokens)
            mask[row, :len(tokens)] = 1
            loss_mask[row, len(prompt):len(tokens)] = True
            old[row, len(prompt):len(tokens)] = torch.tensor(logprobs)
            adv[row, len(prompt):len(tokens)] = advantages[episode]
        feats = [f for *_, features, _ in samples for f in features]
        logits = self.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == self.renderer.image_pad_id).int(),
                            pixel_values=torch.cat([f.pixel_values for f in feats]),
                            image_grid_thw=torch.tensor([f.grid_thw for f in feats]), use_cache=False).logits
        logp = token_logprobs(logits[:, :-1], ids[:, 1:], self.banned)
        entropy = torch.zeros_like(logp)
        out = policy_loss(logp.flatten(), old[:, 1:].flatten(), adv[:, 1:].flatten(), loss_mask[:, 1:].flatten(),
                          entropy.flatten(), self.config.train.clip_low, self.config.train.clip_high)
        (out.loss_sum / max(out.tokens, 1)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.train.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.eval()


def rl_step_times(max_async: int) -> tuple[RunConfig, dict[str, float], list[dict]]:
    """Mean per-step metrics of ``mmref rl`` on the example (the first step is warm-up)."""
    from rich.console import Console

    config = load_run_config(ROOT / "examples" / "color-codeword.toml",
                             [f"max_steps={STEPS + 1}", f"max_async={max_async}",
                              f"output_dir={tempfile.mkdtemp(prefix='mmref-bench-e2e-')}"])
    run_rl(config, Console(file=io.StringIO()))
    metrics = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    keys = ("step_s", "rollout_s", "train_s", "materialize_s", "forward_s", "backward_s", "optimizer_s")
    return config, {k: sum(m[k] for m in metrics[1:]) / STEPS for k in keys}, metrics


def main() -> dict:
    config, sync, metrics = rl_step_times(max_async=0)  # like for like: sample, then train
    _, overlapped, _ = rl_step_times(max_async=1)
    bare = BareLoop(config)
    bare.step(seed=0)  # warm-up
    bare_s = sum(bare.step(seed=1000 * (i + 1)) for i in range(STEPS)) / STEPS
    trained = sync["materialize_s"] + sync["forward_s"] + sync["backward_s"] + sync["optimizer_s"]
    return {
        "benchmark": "e2e", "steps": STEPS, "rollouts_per_step": metrics[0]["rollouts"], "turns": config.env.turns,
        "mmref_rl_step_s": round(sync["step_s"], 3), "bare_step_s": round(bare_s, 3),
        "rl_over_bare": round(sync["step_s"] / bare_s, 2), "target_rl_over_bare": 3.0,
        "mmref_rl_step_s_max_async_1": round(overlapped["step_s"], 3),
        "rl_split_s": {"rollouts (render, HTTP, validation, sampling)": round(sync["rollout_s"], 3),
                       "materialize": round(sync["materialize_s"], 3), "forward": round(sync["forward_s"], 3),
                       "backward": round(sync["backward_s"], 3), "optimizer": round(sync["optimizer_s"], 3),
                       "weight sync + bookkeeping": round(sync["step_s"] - sync["rollout_s"] - trained, 3)},
        "request_bytes_per_step": metrics[-1]["request_bytes"] // (STEPS + 1),
        "ok": sync["step_s"] / bare_s <= 3.0,
    }


if __name__ == "__main__":
    print(json.dumps(main()))
