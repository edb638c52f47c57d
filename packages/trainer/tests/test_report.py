"""The run report: reward curve PNG and a viewer that references only run-dir files."""

import re

from PIL import Image

from mmref.trainer.report import RolloutRecord, TurnRecord, write_reward_curve, write_viewer


def test_reward_curve_is_a_png(tmp_path):
    metrics = [{"step": i, "reward_mean": i / 10} for i in range(10)]
    path = write_reward_curve(metrics, tmp_path / "reward.png", chance=0.25)
    assert Image.open(path).format == "PNG"


def test_viewer_shows_every_step_and_links_only_into_run_dir(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "0123456789abcdef.png").write_bytes(b"x")
    records = [RolloutRecord(step=s, rollout_id=f"r{s}", reward=0.5,
                             turns=[TurnRecord("codeword? <b>", ["0123456789abcdef.png"], "red", 1.0)])
               for s in (0, 3)]
    assert RolloutRecord.from_json(records[0].to_json()) == records[0]
    page = write_viewer(tmp_path, records).read_text()
    assert "step 0" in page and "step 3" in page and "&lt;b&gt;" in page
    for src in re.findall(r"src='([^']+)'", page):
        assert (tmp_path / src).resolve().is_relative_to(tmp_path.resolve()) and (tmp_path / src).exists()
