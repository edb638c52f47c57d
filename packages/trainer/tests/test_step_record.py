"""The step record: the metrics.jsonl line, keys flattened in field order, evals only when any ran."""

from mmref.trainer.step_record import StepRecord


def record(**changes):
    fields = dict(step=2, reward_mean=0.5, reward_by_turn=[0.5], rollouts=8, rollouts_dropped=0, samples=8, rows=1,
                  occupancy=0.25, tokens_per_s=10.0, images_per_s=2.0, rollout_s=1.0, train_s=2.0, step_s=3.0,
                  rollout_times={"collect_s": 1.0, "requests": 4}, samples_s=0.1, pack_s=0.2, trainer_s=1.5,
                  weight_load_s=0.3, request_bytes=100, pixel_values_bytes=5000, off_policy_lag=1,
                  trainer={"loss": 0.1, "ranks": 1})
    return StepRecord(**{**fields, **changes})


def test_as_dict_flattens_rollout_times_and_trainer_metrics_in_field_order():
    assert list(record().as_dict()) == [
        "step", "reward_mean", "reward_by_turn", "rollouts", "rollouts_dropped", "samples", "rows", "occupancy",
        "tokens_per_s", "images_per_s", "rollout_s", "train_s", "step_s", "rollout_collect_s", "rollout_requests",
        "samples_s", "pack_s", "trainer_s", "weight_load_s", "request_bytes", "pixel_values_bytes", "off_policy_lag",
        "loss", "ranks"]
    assert record().as_dict()["rollout_requests"] == 4 and record().as_dict()["loss"] == 0.1


def test_evals_appear_last_and_only_when_any_ran():
    evals = [{"weight_version": 3, "reward_mean": 1.0}]
    line = record(evals=evals).as_dict()
    assert list(line)[-1] == "evals" and line["evals"] == evals
    assert "evals" not in record().as_dict()
