"""A shortened quickstart: every stage runs end to end, the loss falls and held-out accuracy beats chance
on the easy tasks."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_short_quickstart_learns(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "qs"), "TINY": str(tmp_path / "tiny"), "N_TRAIN": "80",
           "N_TEST": "16", "EPOCHS1": "10", "EPOCHS2": "2", "EPOCHS3": "2",
           "GROUPS_SPEC": "vision:image_colour,video_colour audio:audio_class"}
    done = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"'loss': '([0-9.]+)'", done.stdout + done.stderr)]
    assert losses[-1] < losses[0] / 2
    results = json.loads((tmp_path / "qs" / "accuracy.json").read_text())
    for task in ("image_colour", "video_colour"):
        assert results[task]["accuracy"] > results[task]["chance"] + 0.25, results
