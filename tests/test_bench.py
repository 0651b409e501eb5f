"""Smoke run of the benchmark harness (bench/run.py) on a tiny night.

The benchmark itself is not part of the suite (it takes minutes); this runs it at 384 px
with a handful of lights, in a subprocess as a user would, and checks that every tool that
is installed ran, that the table is printed and that the results go where ``--results``
says (never over bench/RESULTS.md). Peers that are not installed are skipped by the
harness itself, with a message.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    before = (REPO / "bench" / "RESULTS.md").stat().st_mtime_ns if (
        REPO / "bench" / "RESULTS.md").exists() else None  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--size", "384", "--frames", "5",
         "--compare-size", "384", "--compare-frames", "5", "--refresh-size", "256",
         "--refresh-frames", "3", "--no-ingest", "--results", str(results)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    lines = out.splitlines()
    head = next(line for line in lines if line.startswith("| tool | s/light | lights/min |"))
    columns = [c.strip() for c in head.strip("|").split("|")]
    row = next(line for line in lines if line.startswith("| observd |"))
    cells = dict(zip(columns, [c.strip() for c in row.strip("|").split("|")], strict=True))
    assert not cells["s/light"].startswith("failed"), row
    assert float(cells["s/light"]) > 0 and float(cells["peak RSS MB"]) > 50
    used, total = cells["frames used"].split("/")
    assert total == "5" and 1 <= int(used) <= 5
    # every peer either ran (a row) or was skipped with a message
    for tool in ("notebook", "ccdproc+astroalign", "siril"):
        assert f"| {tool} |" in out or f"{tool}: skipped" in out, tool
    assert re.search(r"latency: median [\d.]+ s, p95 [\d.]+ s", out)
    assert "Master bias refresh" in out
    text = results.read_text()
    assert "Machine:" in text and "cores" in text and "| observd |" in text
    after = (REPO / "bench" / "RESULTS.md").stat().st_mtime_ns if (
        REPO / "bench" / "RESULTS.md").exists() else None  # fmt: skip
    assert after == before
