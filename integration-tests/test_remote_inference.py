"""``mmref rl`` against a separate ``mmref serve`` process (``inference.url``) over loopback: the run's
rewards, weight versions pushed to that server, a server of another model refused with one typed line, and
the three roles (server, orchestrator, trainer rank started by hand) as separate processes; and the run's
own child server (``inference.process = "child"``): used like a remote one, its log in the run directory,
stopped at the end and on failure."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from mmref.client.environment import vocabulary_of
from mmref.trainer.cli import main
from mmref.trainer.environments import run_environment
from mmref.trainer import orchestrator, rl
from mmref.trainer.checkpoint import read_checkpoint_meta
from mmref.trainer.errors import InferenceStartError, InferenceUnreachableError, ServedModelMismatchError
from mmref.trainer.inference.threaded import free_port
from mmref.trainer.policy_setup import write_task_model_dir
from mmref.trainer.rl import run_rl
from mmref.trainer.serve_process import ServeProcess, child_server, group_alive
from mmref.trainer.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "examples" / "color-codeword.toml")
SMALL = ["rollout.prompts_per_step=2", "rollout.group_size=2", "train.nproc=0"]


def _model_dir(directory: Path, seed: int) -> Path:
    """The tiny task model color-codeword trains (its small vocabulary), written where a server can load it."""
    config = load_run_config(CONFIG, [f"output_dir='{directory}'", f"model.seed={seed}"])
    return write_task_model_dir(config, vocabulary_of(run_environment(config)))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """The run's model served, and a model of the same shape from another seed served beside it."""
    root = tmp_path_factory.mktemp("remote")
    model, other = _model_dir(root / "a", seed=0), _model_dir(root / "b", seed=1)
    store = root / "shared-store"
    started = [ServeProcess(model, store, root / "serve.log"), ServeProcess(other, store, root / "serve-other.log")]
    try:
        yield model, store, [s.wait() for s in started]
    finally:
        for server in started:
            server.stop()


@pytest.mark.timeout(300)
def test_rl_with_inference_url_samples_there_and_pushes_each_steps_weights(servers, tmp_path):
    model, store, (server, _) = servers
    out = tmp_path / "run"
    code = main(["rl", CONFIG, "--max-steps", "2", "--output-dir", str(out), "--set", f"inference.url='{server.url}'",
                 "--set", f"model.path='{model}'", "--set", f"store='{store}'",
                 *[arg for s in SMALL for arg in ("--set", s)]])
    assert code == 0
    metrics = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all('"reward_mean"' in m for m in metrics)
    assert server.health()["weight_version"] == 2  # the trainer POSTed /update_weights after each step
    assert server.health()["batches"] > 0          # and the rollouts sampled there
    assert any(store.iterdir()) and not any((out / "store").iterdir())  # images went to the configured store


def test_server_of_another_model_is_refused_with_a_typed_error(servers, tmp_path):
    model, store, (_, other) = servers
    config = load_run_config(CONFIG, [f"output_dir='{tmp_path / 'run'}'", f"inference.url='{other.url}'",
                                      f"model.path='{model}'", f"store='{store}'", "max_steps=1", *SMALL])
    with pytest.raises(ServedModelMismatchError, match=r"has identity '[0-9a-f]{16}' but this run needs"):
        run_rl(config, Console(quiet=True))
    assert other.health()["weight_version"] == 0  # refused before anything trained or was pushed


def test_unreachable_inference_url_is_one_typed_line(servers, tmp_path):
    model, store, _ = servers
    config = load_run_config(CONFIG, [f"output_dir='{tmp_path / 'run'}'", f"inference.url='http://127.0.0.1:{free_port()}'",
                                      f"model.path='{model}'", "max_steps=1", *SMALL])
    with pytest.raises(InferenceUnreachableError, match="does not answer GET /v1/models"):
        run_rl(config, Console(quiet=True))


def test_vllm_engine_on_a_remote_transformers_server_is_a_mismatch(servers, tmp_path):
    model, store, (server, _) = servers
    base = [f"output_dir='{tmp_path / 'run'}'", f"model.path='{model}'", "inference.engine='vllm'", "max_steps=1", *SMALL]
    with pytest.raises(ServedModelMismatchError, match="has engine 'transformers' but this run needs 'vllm'"):
        run_rl(load_run_config(CONFIG, [*base, f"inference.url='{server.url}'"]), Console(quiet=True))


@pytest.fixture
def children(monkeypatch) -> list[ServeProcess]:
    """Every child server ``mmref rl`` starts in this test, to check it is gone afterwards."""
    started: list[ServeProcess] = []

    def recording(*args, **kwargs) -> ServeProcess:
        started.append(child_server(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(orchestrator, "child_server", recording)
    return started


@pytest.mark.timeout(300)
def test_rl_with_a_child_server_samples_there_pushes_weights_and_stops_it(children, tmp_path):
    out = tmp_path / "run"
    code = main(["rl", CONFIG, "--max-steps", "2", "--output-dir", str(out), "--set", "inference.process='child'",
                 *[arg for s in SMALL for arg in ("--set", s)]])
    assert code == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    assert all(m["sync_bytes"] > 0 and m["sync_s_per_gb"] > 0 for m in metrics)  # checkpoint + POST each step
    (child,) = children
    assert child.proc.poll() is not None and not group_alive(child.proc.pid)  # stopped with everything it started
    log = (out / "inference.log").read_text()
    assert f"mmref serve: {out / 'model'}" in log and "--engine" not in log
    assert read_checkpoint_meta(out / "checkpoints" / "latest")["weight_version"] == 2


@pytest.mark.timeout(400)
def test_a_resumed_run_pushes_its_child_the_restored_weights_before_sampling(children, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = ["rl", CONFIG, "--output-dir", str(out), "--set", "inference.process='child'", "--set", "checkpoint.every=1",
            *[arg for s in SMALL for arg in ("--set", s)]]
    assert main([*args, "--max-steps", "1"]) == 0
    pushed: list[int] = []
    real = orchestrator.post_checkpoint

    def recording(directory, family, url):
        publish = real(directory, family, url)
        return lambda model, version: pushed.append(version) or publish(model, version)

    monkeypatch.setattr(orchestrator, "post_checkpoint", recording)
    assert main([*args, "--max-steps", "2", "--resume"]) == 0
    assert pushed == [1, 2]  # step 1's restored weights before its rollouts, then step 1's update
    assert all(child.proc.poll() is not None for child in children)


def test_child_server_is_stopped_when_the_run_fails(children, tmp_path, monkeypatch):
    async def failing(orch, url, progress, task):
        assert children[0].proc.poll() is None and children[0].health()["status"] == "ok"
        raise RuntimeError("the run failed")

    monkeypatch.setattr(rl, "train_loop", failing)
    config = load_run_config(CONFIG, [f"output_dir='{tmp_path / 'run'}'", "inference.process='child'", "max_steps=1",
                                      *SMALL])
    with pytest.raises(RuntimeError, match="the run failed"):
        run_rl(config, Console(quiet=True))
    assert children[0].proc.poll() is not None and not group_alive(children[0].proc.pid)


def test_vllm_child_without_vllm_is_one_typed_error_with_the_servers_log(children, tmp_path):
    config = load_run_config(CONFIG, [f"output_dir='{tmp_path / 'run'}'", "inference.engine='vllm'",
                                      "inference.gpu_memory_utilization=0.5", "max_steps=1", *SMALL])
    assert config.inference.mode == "child"
    with pytest.raises(InferenceStartError, match=r"(?s)exited with code 2 .*inference\.log.*needs the 'vllm' extra"):
        run_rl(config, Console(quiet=True))
    assert children[0].proc.poll() is not None and not group_alive(children[0].proc.pid)


@pytest.mark.timeout(300)
def test_three_roles_as_separate_processes_server_orchestrator_and_external_trainer_rank(servers, tmp_path):
    model, store, _ = servers
    out = tmp_path / "run"
    with ServeProcess(model, store, tmp_path / "serve.log") as server:
        sets = [f"inference.url='{server.url}'", f"model.path='{model}'", f"store='{store}'", "train.nproc=1",
                "train.launch='external'", "train.rank_timeout_s=120", "train.transport.bind_host='0.0.0.0'",
                "train.transport.connect_host='localhost'", "rollout.prompts_per_step=2", "rollout.group_size=2"]
        orchestrator = subprocess.Popen([sys.executable, "-m", "mmref.trainer.cli", "rl", CONFIG, "--max-steps", "2",
                                         "--output-dir", str(out), *[a for s in sets for a in ("--set", s)]],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            job = out / "trainer-job.json"
            deadline = time.monotonic() + 120
            while not job.exists():
                assert orchestrator.poll() is None and time.monotonic() < deadline, orchestrator.communicate()[0]
                time.sleep(0.2)
            assert json.loads(job.read_text())["pub_address"].startswith("tcp://localhost:")
            trainer = subprocess.run([sys.executable, "-m", "mmref.trainer.cli", "train", str(job),
                                      "--master-port", str(free_port())], capture_output=True, text=True, timeout=240)
            output, _ = orchestrator.communicate(timeout=60)
        finally:
            if orchestrator.poll() is None:
                orchestrator.kill()
        assert trainer.returncode == 0, trainer.stdout[-2000:] + trainer.stderr[-2000:]
        assert orchestrator.returncode == 0, output[-3000:]
        assert "mmref train" in output and server.health()["weight_version"] == 2
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
