"""How `observd run` copes with a burst: N frame files appear at once in the camera folder.

Starts the real daemon (``python -m observd run``) on a temp folder, renames N small
bias frames into the watched folder within a blink, and reports how long the daemon took
to take them all through the pipeline and its memory (RSS) as the backlog drains.

    python bench/daemon_burst.py --files 500 [--mode inotify|polling] [--size 64]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from astropy.io import fits

REPO = Path(__file__).resolve().parents[1]


def bias_bytes(seed: int, size: int, date: str) -> bytes:
    rng = np.random.default_rng(seed)
    data = (1000 + rng.normal(0, 10, (size, size))).astype(np.uint16)
    header = fits.Header({"IMAGETYP": "Bias Frame", "EXPTIME": 0.0, "DATE-OBS": date,
                          "INSTRUME": "BenchCam", "CCD-TEMP": -10.0})  # fmt: skip
    buffer = io.BytesIO()
    fits.PrimaryHDU(data, header).writeto(buffer)
    return buffer.getvalue()


def proc_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--size", type=int, default=64, help="frame size in px")
    ap.add_argument("--mode", choices=("inotify", "polling"), default="inotify")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="observd-burst-") as tmp:
        root = Path(tmp)
        (root / "camera").mkdir()
        staging = root / "staging"
        staging.mkdir()
        config = root / "observd.toml"
        config.write_text(
            '[paths]\nincoming = ["camera"]\nproducts = "products"\ncatalog = "observd.sqlite"\n'
            f'[watch]\nmode = "{args.mode}"\nsettle_seconds = 0.3\npoll_seconds = 0.3\n'
            "[daemon]\nstate_seconds = 0.5\nserve_web = false\n"
        )
        for i in range(args.files):
            date = f"2026-03-14T{1 + i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}"
            (staging / f"bias_{i:05d}.fits").write_bytes(bias_bytes(i, args.size, date))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen([sys.executable, "-m", "observd", "run", "-q", "--config",
                                 str(config)], env=env)  # fmt: skip
        state_file = root / "products" / "state" / "daemon.json"
        while not state_file.exists():
            time.sleep(0.1)
        rss_idle = proc_kb(proc.pid, "VmRSS")
        t0 = time.monotonic()
        for path in sorted(staging.iterdir()):
            os.replace(path, root / "camera" / path.name)
        samples: list[tuple[int, int]] = []
        while True:
            state = json.loads(state_file.read_text())
            samples.append((state["processed"], proc_kb(proc.pid, "VmRSS")))
            if state["processed"] >= args.files and not state["queue"]:
                break
            time.sleep(0.25)
        elapsed = time.monotonic() - t0
        hwm = proc_kb(proc.pid, "VmHWM")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    print(f"{args.files} files of {args.size} px ({args.mode}): all processed in {elapsed:.1f} s"
          f" ({args.files / elapsed:.0f} files/s)")  # fmt: skip
    print(f"RSS idle {rss_idle / 1024:.0f} MB, peak {hwm / 1024:.0f} MB")
    for frac in (0.2, 0.5, 1.0):
        n = int(frac * args.files)
        rss = max((r for p, r in samples if p <= n), default=0)
        print(f"  RSS up to {n:>5} files processed: {rss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
