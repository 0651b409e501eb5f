"""quality.measure, before and after issue #7's speed work, interleaved in one process.

Usage: python bench/measure_cost.py [--sizes 2048 4096] [--repeat 7] [--lights 2] [--check]

For each size a small night is simulated (one target, one filter, ``--lights`` lights
with the simulator's seeing of ~3 px FWHM, Moffat beta 3, cosmic rays and hot pixels) and
each light is calibrated with the *true* bias, dark and flat through
:func:`observd.reduce.calibrate` (so the image and its mask are what the pipeline hands
to ``measure``). Then ``measure`` of ``bench/quality_before.py`` (a verbatim copy of
``observd/quality.py`` before the speed work) and of ``observd.quality`` run
alternately, ``--repeat`` times each, on the same frames: on a shared machine this is the
fair comparison. Printed per size: the median wall ms of both (and CPU ms, all threads:
steadier than the wall time on a shared machine), and of both the FWHM against
the simulator's truth, the elongation, ``n_stars``, ``n_good``, and how many of the old
returned stars the new ones find within 0.5 px (with the median offset).

``--check`` exits with status 1 unless, on every light, the new FWHM is within 2 % of
the simulator's truth, the new ``n_stars`` within 1 % of the old, the elongations agree
to 0.01 and the new stars hold >= 98 % of the old returned ones within 0.5 px.

The first call of each version compiles numba kernels (cached on disk afterwards) and is
not timed. :func:`observd.memory.keep_freed_memory` is called first, as the pipeline does.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from scipy.spatial import cKDTree

from observd import memory, quality, reduce
from observd.logs import setup_logging
from observd.simulate import CameraModel, NightPlan, load_truth, simulate_night


def _old_quality() -> Any:
    path = Path(__file__).with_name("quality_before.py")
    spec = importlib.util.spec_from_file_location("quality_before", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def frames(folder: Path, size: int, lights: int) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Calibrated lights (image, mask, true FWHM) of a simulated night."""
    plan = NightPlan(n_light=lights, n_bias=0, dark_exptimes=(), n_dark=0, n_flat=0,
                     warm_dark=False, filters=("V",), targets=("M 51",), defects=False,
                     meridian_flip=False, wcs="exact")  # fmt: skip
    simulate_night(folder, plan, CameraModel(size=size), truth_images=False)
    truth = load_truth(folder)
    bias, dark = truth.read("bias.fits"), truth.read("dark_rate.fits")
    flat, hot = truth.read("flat_V.fits"), truth.read("hot_pixels.fits").astype(bool)
    out = []
    for f in truth.frames("light"):
        masters = reduce.prepare(bias, dark * np.float32(f.exptime), flat)
        cal = reduce.calibrate(fits.getdata(truth.path(f)), masters, hot=hot)
        out.append((cal.image, cal.mask, float(f.fwhm)))
    return out


def compare(old: quality.Measurement, new: quality.Measurement) -> tuple[float, float]:
    """Fraction of the old returned stars that the new ones hold within 0.5 px, and
    the median offset of those (px)."""
    if len(old.stars) == 0 or len(new.stars) == 0:
        return float("nan"), float("nan")
    d, _ = cKDTree(np.column_stack([new.stars.x, new.stars.y])).query(
        np.column_stack([old.stars.x, old.stars.y])
    )
    hit = d < 0.5
    return float(hit.mean()), float(np.median(d[hit])) if hit.any() else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--lights", type=int, default=2)
    parser.add_argument("--check", action="store_true", help="exit 1 when accuracy slips")
    args = parser.parse_args()
    failures: list[str] = []
    setup_logging("WARNING")
    memory.keep_freed_memory()
    old_q = _old_quality()
    versions = {"old": old_q.measure, "new": quality.measure}
    with tempfile.TemporaryDirectory(prefix="observd-measure-") as tmp:
        for size in args.sizes:
            lights = frames(Path(tmp) / str(size), size, args.lights)
            times: dict[str, list[float]] = {k: [] for k in versions}
            cpu: dict[str, list[float]] = {k: [] for k in versions}
            results: dict[str, list[quality.Measurement]] = {k: [] for k in versions}
            for name, fn in versions.items():  # compile / warm up, untimed
                for image, mask, _ in lights:
                    results[name].append(fn(image, mask=mask))
            for _ in range(args.repeat):
                for name, fn in versions.items():
                    for image, mask, _ in lights:
                        t0, c0 = time.perf_counter(), time.process_time()
                        fn(image, mask=mask)
                        times[name].append(time.perf_counter() - t0)
                        cpu[name].append(time.process_time() - c0)
            print(f"\n{size} px, {len(lights)} lights x {args.repeat} repeats "
                  f"(median ms per light; old and new interleaved)")  # fmt: skip
            for name in versions:
                wall, used = statistics.median(times[name]), statistics.median(cpu[name])
                print(f"  {name}: {1e3 * wall:7.1f} ms (CPU {1e3 * used:7.1f} ms, all threads)")
            speedup = statistics.median(times["old"]) / statistics.median(times["new"])
            print(f"  speed-up {speedup:.2f}x")
            for i, (_, _, true_fwhm) in enumerate(lights):
                print(f"  light {i + 1}: true FWHM {true_fwhm:.3f} px")
                for name in versions:
                    m = results[name][i]
                    err = 100 * (m.fwhm / true_fwhm - 1)
                    print(f"    {name}: FWHM {m.fwhm:.3f} px ({err:+.2f} %"
                          f" of truth), elongation {m.elongation:.3f}, n_stars {m.n_stars},"
                          f" n_good {m.n_good}, stars {len(m.stars)},"
                          f" binning {m.binning}, sky {m.background:.2f}"
                          f" rms {m.background_rms:.3f}")  # fmt: skip
                frac, off = compare(results["old"][i], results["new"][i])
                print(f"    old stars found by new within 0.5 px: {100 * frac:.1f} %"
                      f" (median offset {off:.3f} px)")  # fmt: skip
                failures += check(results["old"][i], results["new"][i], true_fwhm, frac,
                                  f"{size} px light {i + 1}")  # fmt: skip
    if args.check:
        print("\ncheck: " + ("; ".join(failures) if failures else "ok"))
        if failures:
            sys.exit(1)


def check(old: quality.Measurement, new: quality.Measurement, true_fwhm: float,
          found: float, where: str) -> list[str]:
    """What ``--check`` objects to in one light (empty: nothing)."""
    out = []
    if not abs(new.fwhm / true_fwhm - 1) <= 0.02:
        out.append(f"{where}: FWHM {new.fwhm:.3f} px, truth {true_fwhm:.3f} px")
    if not abs(new.n_stars / max(old.n_stars, 1) - 1) <= 0.01:
        out.append(f"{where}: n_stars {new.n_stars}, old {old.n_stars}")
    if not abs(new.elongation - old.elongation) <= 0.01:
        out.append(f"{where}: elongation {new.elongation:.3f}, old {old.elongation:.3f}")
    if not found >= 0.98:
        out.append(f"{where}: {100 * found:.1f} % of the old stars found")
    return out


if __name__ == "__main__":
    main()
