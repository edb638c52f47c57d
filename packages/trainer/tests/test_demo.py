"""``mmref demo`` writes real images into a store and prints refs that parse back."""

from rich.console import Console

from mmref.renderers import FAMILIES, ImageStore
from mmref.trainer.cli import main
from mmref.trainer.demo import SCREENSHOTS, run_demo


def test_demo_stores_each_screenshot_once_and_refs_are_small(tmp_path):
    rows = run_demo(tmp_path, Console(file=open(tmp_path / "out.txt", "w")))
    assert len(rows) == len(SCREENSHOTS) * len(FAMILIES)
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".png"]) == len(SCREENSHOTS)
    assert max(r["ref_bytes"] for r in rows) <= 512
    big = next(r for r in rows if r["image"] == "1080p" and r["family"] == "qwen2-vl")
    assert big["pixel_values_bytes"] > 40 * 2**20 and big["num_tokens"] == 2691


def test_demo_command_prints_table_and_fills_store(tmp_path, capsys):
    assert main(["demo", "--store", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "refs vs pixels" in out and "1080p" in out and "mmref:v1:" in out
    assert ImageStore(tmp_path / "s").stats()["assets"] == len(SCREENSHOTS)
