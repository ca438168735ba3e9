"""docs/plugin-guide.md stays true: its walkthrough is run as written.

Scaffold, replace the code with the guide's section 3, build, feed the guide's frames and compare
with the output the guide shows.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

GUIDE = (ROOT / "docs" / "plugin-guide.md").read_text()


def _block(after: str, lang: str, nth: int = 0) -> str:
    """The nth fenced block of language ``lang`` ("" = no language) after the heading ``after``."""
    blocks: list[tuple[str, str]] = []
    fence: str | None = None
    body: list[str] = []
    for line in GUIDE[GUIDE.index(after):].splitlines(keepends=True):
        if line.startswith("```"):
            if fence is None:
                fence, body = line[3:].strip(), []
            else:
                blocks.append((fence, "".join(body)))
                fence = None
        elif fence is not None:
            body.append(line)
    return [b for f, b in blocks if f == lang][nth]


def flux(*args: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flux_edge", *args],
        cwd=cwd, input=stdin, capture_output=True, text=True, timeout=600, check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_the_guide_walkthrough_works_as_written(tmp_path: Path) -> None:
    r = flux("plugin", "new", "my_meter", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (tmp_path / "my_meter" / "src" / "lib.rs").write_text(_block("## 3. Write it", "rust"))
    r = flux("plugin", "build", "my_meter", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    section5 = _block("## 5. Try it on sample data", "sh")
    frames = re.search(r"<<'EOF'\n(.*?)EOF", section5, re.S)
    config = re.search(r"echo '(.*?)' > config.json", section5)
    assert frames and config
    (tmp_path / "config.json").write_text(config.group(1))
    expected = _block("## 5. Try it on sample data", "", 0)
    r = flux(
        "plugin", "run", "my_meter/my_meter.wasm", "--config", "config.json",
        cwd=tmp_path, stdin=frames.group(1),
    )
    assert r.returncode == 1  # the guide's second frame is an error on purpose
    assert r.stdout == expected
