"""bench.channels_last_compile at its tiny size, so it cannot rot; no timing is asserted."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is not installed; `python -m bench.NAME` runs from root
    sys.path.insert(0, str(ROOT))

from bench import channels_last_compile  # noqa: E402


def test_channels_last_compile_smoke(tmp_path: Path, capsys) -> None:
    out, figures_file = tmp_path / "BENCH.md", tmp_path / "figures.json"
    threads = torch.get_num_threads()
    argv = ["--smoke", "--out", str(out), "--json", str(figures_file)]
    assert channels_last_compile.main(argv) == 0
    assert torch.get_num_threads() == threads  # the 1-thread CPU clock is undone afterwards
    printed = capsys.readouterr().out
    for text in (printed, out.read_text()):
        assert channels_last_compile.HEADING in text and "| timm/test_vit " in text
    figures = json.loads(figures_file.read_text())
    for model in ("timm/test_resnet", "timm/test_vit"):
        for key in ("eager_step_s", "channels_last_over_eager"):
            value = figures[f"{model}:{key}"]
            assert math.isfinite(value) and value > 0, (model, key, value)
