"""Import direction: the commands stand side by side over shared pieces, and inference imports no training stage."""

import ast
from pathlib import Path

import pytest

import mmref.trainer

PACKAGE = Path(mmref.trainer.__file__).parent
COMMANDS = {"rl", "sft", "eval", "train"}
TRAINING = COMMANDS | {"orchestrator", "rl_trainer", "step", "loss", "job", "cli"}


def trainer_imports(path: Path) -> set[str]:
    """The ``mmref.trainer`` modules ``path`` imports (first component after the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        found |= {n.split(".")[2] for n in names if n.startswith("mmref.trainer.")}
    return found


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_command_imports_no_other_command(command):
    assert trainer_imports(PACKAGE / f"{command}.py") & (COMMANDS - {command}) == set()


def test_inference_imports_no_training_stage():
    for path in (PACKAGE / "inference").glob("*.py"):
        assert trainer_imports(path) & TRAINING == set(), path.name


def test_the_orchestrator_names_no_task():
    source = (PACKAGE / "orchestrator.py").read_text()
    assert "color_codeword" not in source and "ColorCodeword" not in source and "envs." not in source
