"""Store faults: many processes writing at once, and writes that fail mid-way."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmref.renderers.store import ImageStore

WRITERS = 16


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64 + seed, 48), ((seed * 37) % 256, 80, 160)).save(buffer, "PNG")
    return buffer.getvalue()


WRITER = """
import io, json, sys
from PIL import Image
from mmref.renderers.store import ImageStore

def png(seed):
    buffer = io.BytesIO()
    Image.new("RGB", (64 + seed, 48), ((seed * 37) % 256, 80, 160)).save(buffer, "PNG")
    return buffer.getvalue()

root, index = sys.argv[1], int(sys.argv[2])
store, results = ImageStore(root), []
for round_ in range(20):
    for data in (png(0), png(1 + (index + round_) % 8)):  # one image shared by all, 8 overlapping ones
        stored = store.put_bytes(data, "image/png")
        results.append([stored.asset, stored.sha256])
print(json.dumps(results))
"""


@pytest.mark.timeout(180)
def test_sixteen_processes_writing_same_and_different_images(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(i)], stdout=subprocess.PIPE, text=True)
             for i in range(WRITERS)]
    try:
        outputs = [p.communicate(timeout=150)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * WRITERS
    assets = {tuple(pair) for out in outputs for pair in json.loads(out)}
    assert len(assets) == 9
    assert sorted(os.listdir(tmp_path)) == sorted(a for a, _ in assets), "temp files or partial assets left behind"
    store = ImageStore(tmp_path)
    for asset, sha in assets:
        assert store.read(asset, sha)  # verifies the full sha256 of every file


def test_disk_full_mid_write_leaves_no_partial_asset(tmp_path, monkeypatch):
    store = ImageStore(tmp_path)
    real_open = open

    class FullDisk(io.RawIOBase):
        def __init__(self, path):
            self.path = path
            real_open(path, "wb").close()  # the temp file exists, as it would on a real disk

        def write(self, data):
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: FullDisk(p) if "w" in mode else real_open(p, mode, *a, **k))
    with pytest.raises(OSError, match="No space left"):
        store.put_bytes(png(3), "image/png")
    monkeypatch.undo()
    assert list(Path(tmp_path).iterdir()) == []
    stored = store.put_bytes(png(3), "image/png")
    assert store.read(stored.asset, stored.sha256) == png(3)
