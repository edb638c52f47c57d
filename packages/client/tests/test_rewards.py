"""Reward functions of the dataset environment: the built-ins, import paths, weights, and typed errors."""

import sys
import textwrap

import pytest

from mmref.client.envs.dataset.rewards import choice, exact, load_rewards, number, regex, total
from mmref.client.errors import RewardFunctionError


@pytest.mark.parametrize("completion, answer, expected", [
    ("Red.", "red", 1.0), ("  blue ", "Blue", 1.0), ("red blue", "red", 0.0), ("", "red", 0.0)])
def test_exact_ignores_case_outer_spaces_and_end_punctuation_only(completion, answer, expected):
    assert exact(completion, answer) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("B", "B", 1.0), ("(C) is right", "C", 1.0), ("The answer is D.", "D", 1.0), ("A or B? B", "B", 0.0),
    ("Both", "B", 0.0), ("E", "E", 0.0)])
def test_choice_takes_the_first_standalone_option_letter(completion, answer, expected):
    assert choice(completion, answer) == expected


def test_choice_letters_are_configurable():
    assert choice("E", "E", choices="ABCDE") == 1.0


@pytest.mark.parametrize("completion, answer, tolerance, expected", [
    ("it is 42", "42", 1e-6, 1.0), ("3 apples, so 7.5", 7.5, 1e-6, 1.0), ("7.4", "7.5", 0.05, 0.0),
    ("7.46", "7.5", 0.05, 1.0), ("-2e3", "-2000", 1e-6, 1.0), ("no number", "1", 1.0, 0.0)])
def test_number_compares_the_last_number_within_the_tolerance(completion, answer, tolerance, expected):
    assert number(completion, answer, tolerance=tolerance) == expected


def test_regex_matches_the_answer_as_a_pattern_or_extracts_with_a_pattern():
    assert regex("cat42", r"cat\d+") == 1.0 and regex("a cat42", r"cat\d+") == 0.0
    assert regex("Answer: Paris.", "paris", pattern=r"Answer:\s*(\w+)") == 1.0
    assert regex("no answer here", "paris", pattern=r"Answer:\s*(\w+)") == 0.0


@pytest.fixture
def scoring(tmp_path, monkeypatch):
    (tmp_path / "my_scoring.py").write_text(textwrap.dedent('''
        def length(completion, answer, row, scale=1.0):
            return scale * len(completion) / row["max_len"]

        def crash(completion, answer):
            raise ValueError("cannot parse " + completion)

        def text(completion, answer):
            return "1"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_scoring"
    sys.modules.pop("my_scoring", None)


def test_several_rewards_sum_with_weights_and_options_and_an_imported_one_gets_the_row(scoring):
    rewards = load_rewards(["exact", {"fn": f"{scoring}:length", "weight": 0.5, "scale": 2.0}])
    assert total(rewards, "red", "red", {"max_len": 6}, "row 0") == pytest.approx(1.0 + 0.5 * 2.0 * 3 / 6)


@pytest.mark.parametrize("spec, match", [
    ("no_such_module_q:fn", r"'no_such_module_q:fn': cannot import 'no_such_module_q'"),
    ("{mod}:absent", r"'{mod}:absent': module '{mod}' has no 'absent'"),
    ("fuzzy", r"'fuzzy' is no built-in \(exact, choice, number, regex\)"),
    ({"weight": 2}, r"needs 'fn'"),
])
def test_reward_specs_that_cannot_be_loaded_are_typed_errors_naming_them(scoring, spec, match):
    spec = spec.format(mod=scoring) if isinstance(spec, str) else spec
    with pytest.raises(RewardFunctionError, match=match.format(mod=scoring)):
        load_rewards([spec])


def test_a_reward_that_raises_or_returns_no_number_is_a_typed_error_naming_it_and_the_row(scoring):
    with pytest.raises(RewardFunctionError, match=rf"'{scoring}:crash' raised ValueError on row 7: cannot parse x"):
        total(load_rewards([f"{scoring}:crash"]), "x", "y", {}, "row 7")
    with pytest.raises(RewardFunctionError, match=r"returned '1' on row 2; expected a finite number"):
        total(load_rewards([f"{scoring}:text"]), "x", "y", {}, "row 2")


def test_no_reward_at_all_is_refused():
    with pytest.raises(RewardFunctionError, match="at least one reward function"):
        load_rewards([])
