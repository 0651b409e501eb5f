"""Reading a raw light and calibrating it: the old numpy code against the compiled one.

Usage: python bench/calibrate_read.py [--sizes 2048 4096] [--repeat 7] [--old f237842]

``--old`` is a git revision of this repository (or a folder holding an observd tree) whose
``observd/reduce.py`` and ``observd/rawio.py`` are loaded beside this tree's (they import
nothing else of observd). For each size a synthetic uint16 light (sky, noise, Gaussian
stars, saturated ones, cosmic rays, hot pixels, vignetting) is written to a temporary FITS
(int16 + BZERO 32768, as cameras write it) with masters (bias, dark, a flat with dead
pixels, a hot-pixel map). Both versions then read the file (bytes, SHA-256, FITS, checks)
and calibrate the light, alternately (each first in turn), ``--repeat`` times, and every
result is checked equal (pixels, header, hash; calibrated image bit for bit, mask,
counts). Prints the median ms, wall clock and (``cpu``) the process's CPU time, all
threads: the hash runs beside the parse and the kernels use both cores, so on a busy
machine the wall time of the new code tends to its CPU time.

The machine may be shared: compare the columns of one run, not runs. The kernels are
compiled (or loaded from numba's disk cache) before the timings.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
from astropy.io import fits

from observd import rawio, reduce
from observd.memory import keep_freed_memory

ROOT = Path(__file__).resolve().parent.parent


def load_old(old: str, name: str) -> ModuleType:
    """``observd/<name>.py`` of a folder or of a git revision, as module ``old_<name>``."""
    folder = Path(old)
    if folder.is_dir():
        source = (folder / "observd" / f"{name}.py").read_text()
    else:
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{old}:observd/{name}.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    path = Path(tempfile.mkdtemp()) / f"old_{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"old_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def scene(n: int, seed: int = 1) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A raw light and its masters (bias, dark, flat, hot)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    flat = 1 - 0.2 * (((xx - n / 2) ** 2 + (yy - n / 2) ** 2) / (n * n / 2))
    del yy, xx
    k = max(20, n * n // 5000)
    img = np.zeros((n, n), np.float32)
    iy, ix = rng.integers(20, n - 20, (2, k))
    np.add.at(img, (iy, ix), (10 ** rng.uniform(2.5, 6.5, k)).astype(np.float32))
    img = cv2.GaussianBlur(img, (0, 0), 3.0 / 2.3548)
    img += 1000 + rng.normal(0, 12, (n, n)).astype(np.float32)
    hy, hx = rng.integers(0, n, (2, n // 8))
    img[hy, hx] += 5000  # cosmic rays
    bias = (300 + rng.normal(0, 3, (n, n))).astype(np.float32)
    dark = rng.uniform(0, 5, (n, n)).astype(np.float32)
    raw = np.clip(img * flat + bias + dark, 0, 65535).astype(np.uint16)
    hot = np.zeros((n, n), bool)
    hot[tuple(rng.integers(0, n, (2, n)))] = True
    raw[hot] = 30000
    flat = flat.astype(np.float32)
    flat[tuple(rng.integers(0, n, (2, 50)))] = 0.0  # dead
    return raw, {"bias": bias, "dark": dark, "flat": flat, "hot": hot}


def same_read(a, b) -> None:
    assert a.sha256 == b.sha256 and a.size == b.size and a.hdu_index == b.hdu_index
    assert a.header.tostring() == b.header.tostring()
    assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data)


def same_calibration(a, b) -> None:
    assert a.counts == b.counts, (a.counts, b.counts)
    assert np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.image, b.image, equal_nan=True)


def bench_size(n: int, repeat: int, old: dict[str, ModuleType], folder: Path) -> dict:
    raw, m = scene(n)
    path = folder / f"light_{n}.fits"
    header = fits.Header({"IMAGETYP": "Light Frame", "EXPTIME": 60.0, "FILTER": "V"})
    fits.PrimaryHDU(raw, header).writeto(path, overwrite=True)
    versions = {"old": (old["rawio"], old["reduce"]), "new": (rawio, reduce)}
    masters = {k: r.prepare(m["bias"], m["dark"], m["flat"]) for k, (_, r) in versions.items()}
    stages = ("read", "calibrate", "read cpu", "calibrate cpu")
    times: dict[str, dict[str, list[float]]] = {k: {s: [] for s in stages} for k in versions}
    sha: list[float] = []
    for i in range(repeat + 1):  # the first round compiles / warms up, not timed
        out = {}
        order = list(versions.items())
        for label, (rio, red) in order if i % 2 else order[::-1]:  # each goes first in turn
            t0, c0 = time.perf_counter(), time.process_time()
            frame = rio.read_raw(path)
            t1, c1 = time.perf_counter(), time.process_time()
            cal = red.calibrate(frame.data, masters[label], hot=m["hot"])
            t2, c2 = time.perf_counter(), time.process_time()
            if i:
                for stage, value in zip(stages, (t1 - t0, t2 - t1, c1 - c0, c2 - c1), strict=True):
                    times[label][stage].append(value)
            out[label] = frame, cal
        same_read(out["old"][0], out["new"][0])
        assert np.array_equal(out["new"][0].data, raw)
        same_calibration(out["old"][1], out["new"][1])
        blob = path.read_bytes()
        t0 = time.perf_counter()
        hashlib.sha256(blob).hexdigest()
        sha.append(time.perf_counter() - t0)
        del blob
    counts = out["new"][1].counts
    return {"times": times, "counts": counts, "bytes": path.stat().st_size, "sha256": sha[1:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--old", default="f237842", help="git revision or observd tree")
    args = parser.parse_args()
    keep_freed_memory()  # as the Pipeline does
    old = {name: load_old(args.old, name) for name in ("rawio", "reduce")}
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start; "
          f"old = {args.old}, median of {args.repeat} interleaved rounds, ms")  # fmt: skip
    print(f"{'size':>6} {'stage':<14} {'old':>8} {'new':>8} {'old/new':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            result = bench_size(n, args.repeat, old, Path(tmp))
            t = result["times"]
            for tl in t.values():
                tl["both"] = [a + b for a, b in zip(tl["read"], tl["calibrate"], strict=True)]
            for stage in ("read", "calibrate", "both", "read cpu", "calibrate cpu"):
                mo = statistics.median(t["old"][stage]) * 1e3
                mw = statistics.median(t["new"][stage]) * 1e3
                print(f"{n:>6} {stage:<14} {mo:8.1f} {mw:8.1f} {mo / mw:7.1f}x")
            sha = statistics.median(result["sha256"]) * 1e3
            print(f"{n:>6} {'sha256 alone (the floor of read)':<30} {sha:8.1f}")
            print(f"{'':>6} ({result['bytes'] / 2**20:.0f} MB file; {result['counts']}; "
                  "all results equal)")  # fmt: skip
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
