"""The README's Python API block runs as written and prints what it says (real offline model)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[1] / "README.md"


def python_block(section: str) -> str:
    text = README.read_text(encoding="utf-8")
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", body, re.S).group(1)


def test_python_api_block_prints_the_table(tmp_path):
    script = tmp_path / "api.py"
    script.write_text(python_block("Python API"), encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {m[0]: float(m[1]) for m in re.findall(r"^\| (\S+) \| ([0-9.]+) \|", run.stdout, re.M)}
    assert set(rows) == {"fp", "int4-channel", "lambda-lloyd", "lambda@2"}
    assert rows["lambda-lloyd"] == pytest.approx(4.0, abs=1e-3) and rows["lambda@2"] == pytest.approx(2.0, abs=1e-3)
    assert (tmp_path / "smollm2.safetensors").is_file()
    assert "torch.Size([1, 512, 49152])" in run.stdout
