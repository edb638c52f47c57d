"""Configuration of an ``mmref rl`` / ``mmref sft`` run: one TOML file, every key checked.

Unknown keys and bad values are errors that name the key. Any value can be overridden on
the command line with ``--set section.key=value`` (parsed as TOML), and the most common
ones have flags (``--max-steps``, ``--output-dir``, ``--ablate-images``).

    >>> config = load_run_config("examples/color-codeword.toml", ["rollout.group_size=4"])
    >>> config.rollout.group_size
    4
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Section):
    """Which model: a model directory (``path``), or the tiny random-init default written into the run directory.

    ``path`` is a ``save_pretrained`` directory (``mmref init tiny-qwen2-vl DIR`` writes one);
    its ``model_type`` gives the family and its processor config the pixel limits.
    ``family``, the sizes and ``seed`` describe the tiny default only (qwen3.5 and kimi-k2.5 need a
    transformers with their classes). ``min_pixels`` and ``max_pixels`` override the directory's
    processor config (and exports carry the override); kimi-k2.5 (navit resize) has none.
    """

    family: Literal["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5", "kimi-k2.5"] = "qwen2-vl"
    path: str | None = None
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    vision_depth: int = Field(1, ge=1)
    seed: int = 0
    min_pixels: int | None = Field(None, gt=0)
    max_pixels: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _pixels_ordered(self) -> ModelConfig:
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}")
        return self


class EnvConfig(_Section):
    """The environment: a built-in name, ``package.module:factory`` or an entry point in ``mmref.environments``.

    ``[env.args]`` go to its factory as keyword arguments (see ``mmref.client.envs.loader``);
    ``ablate_images`` asks the factory for ``blank_images=True`` (same-size blank images).
    """

    name: str = Field("color-codeword", min_length=1)
    args: dict[str, Any] = Field(default_factory=dict)
    ablate_images: bool = False


class RolloutConfig(_Section):
    """Sampling: prompts per step, samples per prompt (a GRPO group), and limits."""

    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=2)
    max_tokens: int = Field(4, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    concurrency: int = Field(64, ge=1)
    # How rewards become advantages: "episode" gives every token the group-normalized episode
    # reward; "turn" gives each turn's tokens its return-to-go (the reward from that turn on),
    # normalized per turn within the group, so a turn is not credited for earlier turns.
    credit: Literal["episode", "turn"] = "episode"
    # Agent environments: "run" gives every call of an agent this section's temperature and
    # top_p (eval: eval.temperature) and caps its max_tokens at max_tokens; "agent" samples
    # as the agent's own calls ask.
    agent_sampling: Literal["run", "agent"] = "run"


class TransportConfig(_Section):
    """Where the micro-batch sockets live: this process binds ``bind_host``, the ranks connect to ``connect_host``.

    Loopback by default; for ranks on other nodes bind ``0.0.0.0`` (or an interface) and give
    the ranks this host's name. Ports 0 pick free ones (only sensible with local ranks).
    """

    bind_host: str = "127.0.0.1"
    connect_host: str | None = None  # None: bind_host
    pub_port: int = Field(0, ge=0, le=65535)
    ready_port: int = Field(0, ge=0, le=65535)


class TrainConfig(_Section):
    """Optimizer and batch shape of the trainer ranks."""

    lr: float = Field(3e-3, gt=0)
    # The rate per optimizer step: linear warmup over `warmup_steps`, then `lr_decay` down to
    # `lr * min_lr_ratio` at the run's last step (see mmref.trainer.lr_schedule).
    warmup_steps: int = Field(0, ge=0)
    lr_decay: Literal["constant", "linear", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    clip_low: float = Field(0.2, ge=0)
    clip_high: float = Field(0.28, ge=0)
    # kl_coef * KL(policy || reference) per loss token, the reference being a frozen copy of the
    # starting weights (k3 estimator, see mmref.trainer.loss); metrics report it as ref_kl.
    kl_coef: float = Field(0.0, ge=0)
    entropy_coef: float = Field(0.0, ge=0)  # exploration bonus: keeps small policies from collapsing early
    # Truncated importance sampling (see mmref.trainer.loss): each token's policy-gradient term times
    # min(exp(trainer logprob - sampler logprob), tis_cap), detached. None or 0: off (the default: the
    # tiny CPU runs sample and train with the same transformers code, where the weight is ~1).
    tis_cap: float | None = Field(None, ge=0)
    max_seq_len: int = Field(2048, ge=16)
    # Trainer ranks under torchrun, fed micro-batches of refs over ZMQ; 0 trains inside the
    # orchestrator's process instead (no torchrun, no transport: the quickest start on a laptop).
    nproc: int = Field(1, ge=0)
    rank_timeout_s: float = Field(600.0, gt=0)  # bounds every wait of a rank: start-up, next step, collectives
    missing_image_policy: Literal["error", "placeholder_zero_loss"] = "error"
    # "local": this process starts torchrun with `nproc` ranks; "external": it writes
    # <output_dir>/trainer-job.json and waits for `nproc` ranks started elsewhere
    # (`mmref train <output_dir>/trainer-job.json --nnodes ...` on each trainer node).
    launch: Literal["local", "external"] = "local"
    transport: TransportConfig = TransportConfig()
    # Precision and memory (see mmref.trainer.precision): "auto" trains in bfloat16 on CUDA and
    # float32 on CPU; the inference engine serves in the same dtype.
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward
    freeze_vision: bool = False           # the vision tower and merger get no gradient and no optimizer state


class EvalConfig(_Section):
    """Evaluation on held-out episodes: each played once, at ``temperature`` (0: greedy).

    ``every``: after every that many steps and after the last (0: never); ``split``: the
    dataset split (``eval``, or the ``train`` rows in file order); seeded environments without
    splits play fixed episodes that training never draws.
    """

    every: int = Field(0, ge=0)
    split: Literal["eval", "train"] = "eval"
    num_examples: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0)
    before_training: bool = False


InferenceMode = Literal["in_process", "child", "url"]
VLLM_ONLY_KEYS = ("gpu_memory_utilization", "tensor_parallel_size")
SERVER_KEYS = ("max_model_len", "dtype", *VLLM_ONLY_KEYS)  # how mmref rl starts a server: not for inference.url


class InferenceConfig(_Section):
    """The inference server the rollouts call: started by ``mmref rl``, or a running ``mmref serve`` at ``url``.

    ``process`` says where ``mmref rl`` starts it: ``"in_process"`` (the transformers engine on a
    loopback thread of this process) or ``"child"`` (``mmref serve`` as a child process on a
    loopback port, its output in ``<output_dir>/inference.log``, stopped when the run ends or
    fails; the run then talks to it exactly as to ``url``). Default: ``"in_process"`` for
    ``engine = "transformers"``, ``"child"`` for ``"vllm"`` (vLLM runs only in a server process).

    With ``url`` the server must serve this run's model directory (``model.path``; checked
    against its ``/v1/models`` fingerprint and identity), read the run's ``store`` and read
    the checkpoints the trainer writes under ``output_dir``: a shared filesystem.
    ``host``/``port`` are where the server ``mmref rl`` starts listens (in process or child).

    Server keys (refused with ``url``: pass them to that ``mmref serve``): ``max_model_len`` caps
    prompt + completion tokens; ``dtype`` is the engine's (None: the trainer's, ``train.dtype``);
    ``gpu_memory_utilization`` and ``tensor_parallel_size`` go to vLLM's engine and are refused
    for the transformers engine, which has no such knob.
    """

    engine: Literal["transformers", "vllm"] = "transformers"
    process: Literal["in_process", "child"] | None = None
    url: str | None = Field(None, pattern=r"^https?://")
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0: pick a free port; refused with url (nothing listens here)
    max_model_len: int | None = Field(None, ge=16)
    dtype: Literal["float32", "bfloat16"] | None = None
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    tensor_parallel_size: int | None = Field(None, ge=1)

    @property
    def mode(self) -> InferenceMode:
        """Where the server runs: at ``url``, or started by ``mmref rl`` in this process or as a child."""
        if self.url:
            return "url"
        return self.process or ("child" if self.engine == "vllm" else "in_process")

    @model_validator(mode="after")
    def _keys_apply(self) -> InferenceConfig:
        given = [key for key in SERVER_KEYS if getattr(self, key) is not None] + ["port"] * bool(self.port)
        if self.url and (given or self.process):
            key = given[0] if given else "process"
            raise ValueError(f"inference.{key} sets up a server mmref rl starts, but inference.url is a running "
                             f"server: pass it to that `mmref serve` (or drop inference.url)")
        if self.engine == "vllm" and self.mode == "in_process":
            raise ValueError("inference.engine = 'vllm' runs in a server process: set inference.process = 'child' "
                             "(the default for vllm) or inference.url")
        vllm_only = [key for key in VLLM_ONLY_KEYS if getattr(self, key) is not None]
        if self.engine != "vllm" and vllm_only:
            raise ValueError(f"inference.{vllm_only[0]} applies to inference.engine = 'vllm' only; the "
                             f"{self.engine} engine has no such setting")
        return self


class LogConfig(_Section):
    """Where metrics go besides ``metrics.jsonl`` (the source of truth): W&B and TensorBoard (optional extras)."""

    wandb: bool = False
    wandb_project: str = "mmref"
    wandb_mode: Literal["online", "offline", "disabled"] = "online"
    run_name: str | None = None  # default: the output directory's name
    tensorboard: bool = False    # event files under <output_dir>/tensorboard


class CheckpointConfig(_Section):
    """Exports: ``<output_dir>/checkpoints/step_N`` model directories (weights, config, tokenizer, processor).

    One every ``every`` steps (0: none on the way) and one after the last step; only the
    newest ``keep_last`` are kept (None: all).
    """

    every: int = Field(0, ge=0)
    keep_last: int | None = Field(None, ge=1)


class RunConfig(_Section):
    """A whole run."""

    max_steps: int = Field(60, ge=1)
    max_async: int = Field(1, ge=0, le=1)  # 0: sample, then train; 1: sample the next batch while training (lag <= 1)
    seed: int = 0
    output_dir: str = "runs/color-codeword"
    store: str | None = None  # image store root (directory or fsspec URL) every role reads; None: <output_dir>/store
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig = ModelConfig()
    env: EnvConfig = EnvConfig()
    rollout: RolloutConfig = RolloutConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    inference: InferenceConfig = InferenceConfig()
    log: LogConfig = LogConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()


class ConfigError(ValueError):
    """A run config that cannot be loaded; the message names the key and the problem."""


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"rollout.group_size=4"`` -> ``("rollout.group_size", 4)``; values are TOML (bare words are strings)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML run config (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for override in overrides:
        _set_path(data, *parse_override(override))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid run config{f' {path}' if path else ''}: {validation_problems(exc)}") from None


def validation_problems(exc: ValidationError) -> str:
    """Each problem of a pydantic validation error as ``dotted.key: message``, on one line."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
