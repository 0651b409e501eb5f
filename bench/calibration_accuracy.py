"""Master calibrations against the simulator's truth: the figures of the acceptance list.

Usage: python bench/calibration_accuracy.py [--size 1024]

Simulates the default calibration set (15 biases, 7 darks at 30/60/120 s, 9 flats in
R, V, B), takes it through the real pipeline and prints each figure next to its target.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import numpy as np
from astropy.io import fits

from observd.catalog import Catalog
from observd.config import config_from_dict
from observd.ingest import find_frame_files, in_time_order
from observd.logs import setup_logging
from observd.pipeline import Pipeline
from observd.simulate import CameraModel, NightPlan, simulate_night


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    setup_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="observd-bench-") as tmp:
        folder = Path(tmp)
        truth = simulate_night(folder / "sim", NightPlan(n_light=0, targets=()),
                               CameraModel(size=args.size))  # fmt: skip
        config = config_from_dict(
            {
                "paths": {"products": str(folder / "p"), "catalog": str(folder / "o.sqlite")},
                "site": {"timezone": truth.plan.timezone},
            }  # fmt: skip
        )
        with Catalog(config.paths.catalog) as cat:
            pipeline = Pipeline(config, cat)
            for path in in_time_order(
                find_frame_files([folder / "sim" / "camera"], config), config
            ):
                pipeline.process(path)
            pipeline.finish()
            report(truth, cat)


def report(truth, cat: Catalog) -> None:
    cam, n = truth.camera, truth.camera.size
    cur = {(m["kind"], m["filter"]): m for m in cat.masters("status = 'current'")}

    def data(kind, filt=None, ext=0):
        return fits.getdata(cur[(kind, filt)]["current_path"], ext).astype(np.float64)

    bias = cur[("bias", None)]
    err = np.sqrt(np.mean((data("bias") - truth.read("bias.fits")) ** 2))
    ideal = cam.read_noise / cam.gain / math.sqrt(bias["n_frames"])
    print(f"{n} px, default night: {bias['n_frames']} biases")
    print(f"master bias rms error      {err / ideal:6.3f} x RN/sqrt(N)   (target <= 1.1)")
    ratio = np.median(data("darkrate") / truth.read("dark_rate.fits"))
    print(f"dark-rate map / truth      {ratio:6.3f} (median per pixel) (target 1 +- 0.03)")
    hot, true_hot = data("darkrate", ext="HOTPIX") > 0, truth.read("hot_pixels.fits")
    found = (hot & true_hot).sum() / true_hot.sum()
    false = (hot & ~true_hot).sum() / true_hot.sum()
    print(f"hot pixels found / false   {100 * found:5.1f} % / {100 * false:.2f} %"
          f"   (target >= 95 % / <= 1 %)")  # fmt: skip
    e = int(round(0.02 * n))
    inner = (slice(e, n - e), slice(e, n - e))
    for filt in truth.plan.filters:
        r = data("flat", filt) / truth.read(f"flat_{filt}.fits")
        r /= np.median(r[inner])
        rms = np.sqrt(np.mean((r[inner] - 1) ** 2))
        levels = [f.flat_level - cam.bias_level for f in truth.frames("flat", filter=filt)]
        s = np.array(levels) * cam.gain
        ideal = 1 / np.sqrt(np.sum(s**2 / (s + cam.read_noise**2)))
        noise = 1.4826 * np.median(np.abs(np.diff(r[inner] - 1, axis=1))) / math.sqrt(2)
        print(f"flat {filt}: rms vs truth {100 * rms:5.2f} % (<= 0.5 %), noise "
              f"{noise / ideal:5.3f} x ideal (<= 1.1)")  # fmt: skip
    (h,) = cat.camera_health(truth.plan.night)
    print(f"read noise {h['read_noise_e']:.3f} e- (truth {cam.read_noise}), gain {h['gain']:.4f} "
          f"(truth {cam.gain}), dark current {h['dark_current_e']:.4f} e-/s "
          f"(truth {cam.dark_current})")  # fmt: skip


if __name__ == "__main__":
    main()
