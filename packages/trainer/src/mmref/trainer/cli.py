"""The ``mmref`` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any


def _demo(args: argparse.Namespace) -> int:
    from mmref.trainer.demo import run_demo

    root = args.store or tempfile.mkdtemp(prefix="mmref-demo-")
    run_demo(root)
    return 0


def _init(args: argparse.Namespace) -> int:
    from mmref.trainer.models import TINY_FAMILIES
    from mmref.trainer.tiny_dir import write_tiny_model_dir

    family = args.model.removeprefix("tiny-")
    if family not in TINY_FAMILIES or not args.model.startswith("tiny-"):
        print(f"mmref init: unknown model {args.model!r}; choose one of {[f'tiny-{f}' for f in TINY_FAMILIES]}",
              file=sys.stderr)
        return 2
    path = write_tiny_model_dir(family, args.directory, seed=args.seed,
                                min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    print(f"mmref init: wrote {args.model} to {path} (use it with --set model.path={path} or serve --model {path})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from mmref.renderers.store import ImageStore
    from mmref.trainer.inference import create_app, load_served_model

    try:
        vllm_args = {key: getattr(args, key) for key in ("gpu_memory_utilization", "tensor_parallel_size")
                     if getattr(args, key) is not None}
        served = load_served_model(args.model, engine=args.engine, device=args.device, min_pixels=args.min_pixels,
                                   max_pixels=args.max_pixels, max_model_len=args.max_model_len, dtype=args.dtype,
                                   vllm_args=vllm_args)
    except ValueError as exc:  # a ModelDirError, or engine settings the engine refuses
        print(f"mmref serve: {exc}", file=sys.stderr)
        return 2
    app = create_app(served, ImageStore(args.store), cache_bytes=args.cache_mb * 2**20)
    print(f"mmref serve: {served.name} ({served.family}, fingerprint {served.spec.fingerprint[:12]}) "
          f"on http://{args.host}:{args.port}, store {args.store}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")  # returns on SIGTERM / Ctrl-C
    finally:
        getattr(served.engine, "shutdown", lambda: None)()  # vLLM: its engine core and workers
    return 0


def _intercept(args: argparse.Namespace) -> int:
    import uvicorn

    from mmref.client.interception import create_interception_app
    from mmref.client.train_client import TrainClient
    from mmref.renderers import ImageStore, layout_spec
    from mmref.renderers.render import create_renderer
    from mmref.renderers.tokenizer import family_tokenizer

    pixels = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v}
    renderer = create_renderer(family_tokenizer(args.family), args.family, spec=layout_spec(args.family, **pixels))
    app = create_interception_app(renderer, TrainClient(args.inference), ImageStore(args.store), trace_dir=args.trace_dir)
    print(f"mmref intercept: OpenAI-compatible endpoint on http://{args.host}:{args.port}/v1 -> {args.inference}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _rl(args: argparse.Namespace) -> int:
    from mmref.trainer.rl import run_rl

    return _run_with_config(args, "rl", lambda config: run_rl(config, resume=args.resume))


def _sft(args: argparse.Namespace) -> int:
    from mmref.trainer.sft import run_sft

    return _run_with_config(args, "sft", run_sft)


def _eval(args: argparse.Namespace) -> int:
    from mmref.trainer.eval import run_eval

    return _run_with_config(args, "eval", lambda config: run_eval(config, args.checkpoint))


def _run_with_config(args: argparse.Namespace, command: str, run: Any) -> int:
    """Load the TOML config with the command line's overrides and run ``run(config)``; exit 2 on a bad config."""
    from mmref.renderers.errors import MMRefError
    from mmref.trainer.errors import ModelDirError, ResumeError, RunDirError
    from mmref.trainer.run_config import ConfigError, load_run_config

    overrides = list(args.set or [])
    if args.max_steps is not None:
        overrides.append(f"max_steps={args.max_steps}")
    if args.output_dir is not None:
        overrides.append(f"output_dir='{args.output_dir}'")
    if args.ablate_images:
        overrides.append("env.ablate_images=true")
    try:
        config = load_run_config(args.config, overrides)
    except ConfigError as exc:
        print(f"mmref {command}: {exc}", file=sys.stderr)
        return 2
    try:
        run(config)
    except (ConfigError, ModelDirError, RunDirError, ResumeError) as exc:  # the user's config, model or output dir
        print(f"mmref {command}: {exc}", file=sys.stderr)
        return 2
    except MMRefError as exc:  # a typed failure (a rank died, a missing image, ...): its message says what
        print(f"mmref {command}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mmref {command}: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    return 0


def _train(args: argparse.Namespace) -> int:
    from mmref.trainer.errors import ModelDirError
    from mmref.trainer.launch import LaunchConfig, launch
    from pydantic import ValidationError

    from mmref.trainer.policy import inspect_model_dir
    from mmref.trainer.run_config import validation_problems
    from mmref.trainer.job import DistributedJob

    try:  # before torchrun starts: a bad job or model directory is one line here, not a traceback per rank
        job = DistributedJob.model_validate_json(Path(args.config).read_text())
        if job.model_path is not None:
            inspect_model_dir(job.model_path, min_pixels=job.min_pixels, max_pixels=job.max_pixels)
    except ModelDirError as exc:
        print(f"mmref train: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValidationError) as exc:
        problem = validation_problems(exc) if isinstance(exc, ValidationError) else exc.strerror
        print(f"mmref train: job {args.config}: {problem}", file=sys.stderr)
        return 2
    config = LaunchConfig(nproc_per_node=args.nproc_per_node, nnodes=args.nnodes, node_rank=args.node_rank,
                          master_addr=args.master_addr, master_port=args.master_port, timeout_s=args.timeout)
    result = launch(["-m", "mmref.trainer.train", args.config], config)
    sys.stdout.write(result.output)
    if result.returncode != 0:
        print(f"mmref train: job failed with exit code {result.returncode} after {result.elapsed_s:.1f}s", file=sys.stderr)
    return result.returncode


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="mmref", description="RL for vision-language models with image refs")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="write generated screenshots to a store and print their refs and layouts")
    demo.add_argument("--store", help="store root (directory or fsspec URL); default: a new temp dir")
    demo.set_defaults(func=_demo)
    init = sub.add_parser("init", help="write the tiny random model of a family as a model directory")
    init.add_argument("model", help="tiny-<family>: tiny-qwen2-vl, tiny-qwen2.5-vl, tiny-qwen3-vl, tiny-qwen3.5 "
                                    "or tiny-kimi-k2.5 (the last two where transformers has them)")
    init.add_argument("directory", help="where to write it (replaced if it exists)")
    init.add_argument("--seed", type=int, default=0)
    init.add_argument("--min-pixels", type=int, help="processor min_pixels (default: the family's published one)")
    init.add_argument("--max-pixels", type=int, help="processor max_pixels (default: the family's published one)")
    init.set_defaults(func=_init)
    serve = sub.add_parser("serve", help="run the inference server (refs in, completions and logprobs out)")
    serve.add_argument("--model", default="tiny-qwen2-vl", help="model directory or tiny-<family> (default)")
    serve.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    serve.add_argument("--store", required=True, help="image store root (directory or fsspec URL)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--device", default="cpu")
    serve.add_argument("--min-pixels", type=int, help="override the processor's min_pixels")
    serve.add_argument("--max-pixels", type=int, help="override the processor's max_pixels")
    serve.add_argument("--max-model-len", type=int, help="cap prompt + completion tokens (default: the model's limit)")
    serve.add_argument("--cache-mb", type=int, default=512, help="feature cache budget in MiB")
    serve.add_argument("--dtype", choices=["float32", "bfloat16"],
                       help="the engine's dtype (default: the model's own; float32 for vllm)")
    serve.add_argument("--gpu-memory-utilization", type=float, help="vllm only: fraction of GPU memory it may use")
    serve.add_argument("--tensor-parallel-size", type=int, help="vllm only: GPUs the model is split across")
    serve.set_defaults(func=_serve)
    intercept = sub.add_parser("intercept", help="OpenAI-compatible endpoint that records traces for agent code")
    intercept.add_argument("--inference", required=True, help="base URL of the inference server")
    intercept.add_argument("--store", required=True, help="image store root shared with the inference server")
    intercept.add_argument("--family", default="qwen2-vl")
    intercept.add_argument("--host", default="127.0.0.1")
    intercept.add_argument("--port", type=int, default=8100)
    intercept.add_argument("--trace-dir", help="write each episode's trace to DIR/<session>.<episode>.json after every call")
    intercept.add_argument("--min-pixels", type=int)
    intercept.add_argument("--max-pixels", type=int)
    intercept.set_defaults(func=_intercept)
    for name, func, text in (
            ("rl", _rl, "run RL end to end (inference server, rollouts, training) from a TOML config"),
            ("sft", _sft, "supervised warm start in processed mode (demonstrations from the environment)"),
            ("eval", _eval, "evaluate a checkpoint on the environment's held-out episodes ([eval])")):
        run = sub.add_parser(name, help=text)
        run.add_argument("config", nargs="?", help="run config TOML (default: built-in defaults)")
        run.add_argument("--max-steps", type=int)
        run.add_argument("--output-dir")
        run.add_argument("--ablate-images", action="store_true", help="replace every image by a blank one (control run)")
        run.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="override any config value, e.g. train.lr=1e-3")
        if name == "rl":
            run.add_argument("--resume", action="store_true",
                             help="continue the run in the output directory from its newest saved state")
        if name == "eval":
            run.add_argument("--checkpoint", help="checkpoint directory (default: model.path, else the initial weights)")
        run.set_defaults(func=func)
    train = sub.add_parser("train", help="run the trainer ranks under torchrun (micro-batches from a packer over ZMQ)")
    train.add_argument("config", help="job JSON (mmref.trainer.job.DistributedJob)")
    train.add_argument("--nproc-per-node", type=int, default=1)
    train.add_argument("--nnodes", type=int, default=1)
    train.add_argument("--node-rank", type=int, default=0)
    train.add_argument("--master-addr", default="127.0.0.1")
    train.add_argument("--master-port", type=int, default=29500)
    train.add_argument("--timeout", type=float, default=24 * 3600.0, help="wall-clock limit of the job in seconds")
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``mmref`` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
