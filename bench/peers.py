"""What an observer would use instead of observd, run on the same simulated night.

Each peer reads the night's raw files (biases, darks at the lights' exposure, flats and
lights of one target in one filter, in DATE-OBS order), builds its masters, calibrates,
registers every light onto the first one and stacks, then writes its stack as a FITS file.
Each returns a dict of phase timings: ``masters_s`` (building the masters) and
``lights_s`` (everything done per light, the final combine included), ``n_lights``
(given), ``frames_used`` and ``stack`` (the path). :mod:`bench.run` runs each in its own
subprocess to measure its peak memory.

- :func:`notebook`: the course notebook. astropy + numpy: mean bias, mean dark per
  exposure (bias subtracted), median of normalised flats; calibrate; ``reproject_interp``
  every light onto the first light's WCS; sum.
- :func:`ccdproc_astroalign`: ccdproc's ``combine`` for the masters (sigma-clipped
  average; median of normalised flats), ``ccd_process`` per light, ``astroalign.register``
  onto the first light, sigma-clipped average ``combine``. Lights astroalign cannot
  solve are dropped (as a user would).
- :func:`siril`: Siril 1.0.6's headless ``siril-cli`` with a script: masters, ``preprocess``,
  ``register``, ``stack`` (sigma rejection, ``-norm=add``); two scripts, so that the masters
  and the lights are timed apart.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

__all__ = ["ccdproc_astroalign", "notebook", "siril", "siril_available"]


def _read(path: Path) -> tuple[np.ndarray, fits.Header]:
    with fits.open(path, memmap=False) as hdul:
        return hdul[0].data.astype(np.float64), hdul[0].header


def notebook(files: dict[str, list[Path]], out: Path) -> dict[str, Any]:
    """The course notebook's method: numpy masters, reproject_interp, sum."""
    from astropy.wcs import WCS, FITSFixedWarning
    from reproject import reproject_interp

    warnings.simplefilter("ignore", FITSFixedWarning)
    t0 = time.perf_counter()
    bias = np.mean([_read(p)[0] for p in files["bias"]], axis=0)
    darks: dict[float, list[np.ndarray]] = {}
    for p in files["dark"]:
        data, h = _read(p)
        darks.setdefault(float(h["EXPTIME"]), []).append(data - bias)
    dark = {t: np.mean(v, axis=0) for t, v in darks.items()}
    flats = []
    for p in files["flat"]:
        data = _read(p)[0] - bias
        flats.append(data / np.median(data))
    flat = np.median(flats, axis=0)
    flat /= np.median(flat)
    del flats
    t1 = time.perf_counter()
    total = None
    ref_wcs = None
    for p in files["light"]:
        data, h = _read(p)
        cal = (data - bias - dark[float(h["EXPTIME"])]) / flat
        wcs = WCS(h, naxis=2)
        if ref_wcs is None:
            ref_wcs, shape = wcs, cal.shape
            total = np.zeros(shape)
        warped, footprint = reproject_interp((cal, wcs), ref_wcs, shape_out=shape)
        total += np.nan_to_num(warped)
    t2 = time.perf_counter()
    fits.PrimaryHDU(total.astype(np.float32)).writeto(out, overwrite=True)
    return {"masters_s": t1 - t0, "lights_s": t2 - t1, "frames_used": len(files["light"]),
            "stack": str(out)}  # fmt: skip


def ccdproc_astroalign(files: dict[str, list[Path]], out: Path) -> dict[str, Any]:
    """ccdproc masters and calibration, astroalign registration, sigma-clipped average."""
    import astroalign
    import astropy.units as u
    import ccdproc
    from astropy.nddata import CCDData

    warnings.simplefilter("ignore")

    def ccd(p: Path) -> CCDData:
        data, h = _read(p)
        return CCDData(data, unit="adu", meta=h)

    clip = {"sigma_clip": True, "sigma_clip_low_thresh": 3, "sigma_clip_high_thresh": 3,
            "sigma_clip_func": np.ma.median, "sigma_clip_dev_func": np.ma.std}  # fmt: skip
    t0 = time.perf_counter()
    bias = ccdproc.combine([ccd(p) for p in files["bias"]], method="average", **clip)
    dark = ccdproc.combine(
        [ccdproc.subtract_bias(ccd(p), bias) for p in files["dark"]], method="average", **clip
    )
    flats = [ccdproc.subtract_bias(ccd(p), bias) for p in files["flat"]]
    flat = ccdproc.combine(flats, method="median",
                           scale=lambda a: 1.0 / np.ma.median(a))  # fmt: skip
    del flats
    t1 = time.perf_counter()
    ref = None
    registered = []
    dropped = 0
    dark_t = float(dark.meta["EXPTIME"]) * u.s
    for p in files["light"]:
        light = ccd(p)
        cal = ccdproc.ccd_process(light, master_bias=bias, dark_frame=dark, master_flat=flat,
                                  dark_exposure=dark_t,
                                  data_exposure=float(light.meta["EXPTIME"]) * u.s)  # fmt: skip
        if ref is None:
            ref = cal.data
            registered.append(CCDData(ref.astype(np.float32), unit="adu"))
            continue
        try:
            img, footprint = astroalign.register(cal.data, ref, fill_value=np.nan)
        except Exception:  # MaxIterError, TooFewStarsError: a user drops the frame
            dropped += 1
            continue
        registered.append(CCDData(img.astype(np.float32), unit="adu", mask=footprint))
    stack = ccdproc.combine(registered, method="average", **clip)
    t2 = time.perf_counter()
    fits.PrimaryHDU(np.asarray(stack.data, dtype=np.float32)).writeto(out, overwrite=True)
    return {"masters_s": t1 - t0, "lights_s": t2 - t1, "frames_used": len(registered),
            "dropped": dropped, "stack": str(out)}  # fmt: skip


def siril_available() -> str | None:
    """The siril-cli binary, or None."""
    return shutil.which("siril-cli")


_MASTERS_SSF = """requires 1.0.0
cd bias
link bias -out=../process
cd ../process
stack bias rej 3 3 -nonorm -out=../masters/bias_stacked
cd ../flat
link flat -out=../process
cd ../process
preprocess flat -bias=../masters/bias_stacked
stack pp_flat rej 3 3 -norm=mul -out=../masters/pp_flat_stacked
cd ../dark
link dark -out=../process
cd ../process
stack dark rej 3 3 -nonorm -out=../masters/dark_stacked
"""

_LIGHTS_SSF = """requires 1.0.0
cd light
link light -out=../process
cd ../process
preprocess light -dark=../masters/dark_stacked -flat=../masters/pp_flat_stacked
register pp_light
stack r_pp_light rej 3 3 -norm=add -out=../result
"""


def siril(files: dict[str, list[Path]], out: Path, work: Path) -> dict[str, Any]:
    """Siril 1.0.6 by script: masters, then preprocess + register + stack of the lights.

    ``link`` takes every image of the current folder, so each kind gets a folder of
    symbolic links named in DATE-OBS order (the first light is Siril's reference).
    """
    exe = siril_available()
    if exe is None:
        raise FileNotFoundError("siril-cli not installed")
    for kind in ("bias", "dark", "flat", "light"):
        d = work / kind
        d.mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(files[kind], 1):
            os.symlink(p, d / f"{kind}_{i:05d}.fits")
    (work / "process").mkdir(exist_ok=True)
    (work / "masters").mkdir(exist_ok=True)
    timings = {}
    logs = []
    for name, script in (("masters", _MASTERS_SSF), ("lights", _LIGHTS_SSF)):
        ssf = work / f"{name}.ssf"
        ssf.write_text(script)
        t0 = time.perf_counter()
        proc = subprocess.run([exe, "-d", str(work), "-s", str(ssf)], capture_output=True,
                              text=True, timeout=3600)  # fmt: skip
        timings[f"{name}_s"] = time.perf_counter() - t0
        log = proc.stdout + proc.stderr
        (work / f"{name}.log").write_text(log)
        logs.append(log)
        if proc.returncode != 0:
            tail = "; ".join(line for line in log.splitlines()[-6:] if line.strip())
            raise RuntimeError(f"siril-cli {name} script failed ({proc.returncode}): {tail}")
    result = next((p for p in work.glob("result.fit*")), None)
    if result is None:
        raise RuntimeError("siril-cli wrote no result: " + logs[-1].splitlines()[-1:][0])
    with fits.open(result) as hdul:
        data = np.asarray(hdul[0].data, dtype=np.float32)
        h = hdul[0].header
    used = h.get("STACKCNT") or h.get("NCOMBINE")
    if used is None:
        m = re.findall(r"(\d+) (?:images|files) (?:will be |are )?stacked", logs[-1])
        used = int(m[-1]) if m else None
    fits.PrimaryHDU(data).writeto(out, overwrite=True)
    return {"masters_s": timings["masters_s"], "lights_s": timings["lights_s"],
            "frames_used": used, "stack": str(out)}  # fmt: skip
