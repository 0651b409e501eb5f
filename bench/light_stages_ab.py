"""A/B of the light path's stages, old code against new, interleaved in one process.

Usage: python bench/light_stages_ab.py OLD_TREE [--size 4096] [--repeat 5]

OLD_TREE is a checkout (e.g. ``git archive <commit> | tar -x -C /tmp/old``) whose
``observd/{reduce,quality,register,stack}.py`` are loaded beside this tree's (they import
nothing else of observd). A synthetic frame (sky, noise, Gaussian stars, a few
saturated ones, cosmic rays, vignetting) is calibrated, measured, warped onto a shifted grid and
folded into a running coadd by both versions, alternately, so both see the same load:
on a shared machine this is the fair comparison. Prints the median ms per stage.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from observd import quality, reduce, register, stack


def load(tree: Path, name: str):
    spec = importlib.util.spec_from_file_location(f"old_{name}", tree / "observd" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def scene(n: int, seed: int, shift: tuple[float, float], flat: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(seed)
    star = np.random.default_rng(7)
    k = max(20, n * n // 5000)
    xs, ys = star.uniform(20, n - 20, k), star.uniform(20, n - 20, k)
    flux = 10 ** star.uniform(2.5, 6.5, k)
    img = np.zeros((n, n), np.float32)
    ix = np.clip(np.rint(xs + shift[0]).astype(int), 0, n - 1)
    iy = np.clip(np.rint(ys + shift[1]).astype(int), 0, n - 1)
    np.add.at(img, (iy, ix), flux.astype(np.float32))
    img = cv2.GaussianBlur(img, (0, 0), 3.0 / 2.3548)
    img += 1000 + rng.normal(0, 12, (n, n)).astype(np.float32)
    hits = rng.integers(0, n, (2, n // 8))
    img[hits[0], hits[1]] += 5000
    return np.clip(img * flat + 300, 0, 65535).astype(np.uint16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n = args.size
    old = {name: load(args.old, name) for name in ("reduce", "quality", "register", "stack")}
    new = {"reduce": reduce, "quality": quality, "register": register, "stack": stack}
    bias = np.full((n, n), 300, np.float32)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    flat = 1 - 0.2 * (((xx - n / 2) ** 2 + (yy - n / 2) ** 2) / (n * n / 2))
    flat = flat.astype(np.float32)
    hot = np.zeros((n, n), bool)
    hot[tuple(np.random.default_rng(3).integers(0, n, (2, n)))] = True
    frames = [scene(n, s, (0.37 * s, -0.21 * s), flat) for s in range(args.repeat + 4)]
    times: dict[str, dict[str, list[float]]] = {"old": {}, "new": {}}
    coadds = {}
    grids = {}
    for i, raw in enumerate(frames):
        for label, mods in (("old", old), ("new", new)):
            t = times[label]
            t0 = time.perf_counter()
            masters = mods["reduce"].prepare(bias, None, flat)
            cal = mods["reduce"].calibrate(raw, masters, hot=hot)
            t.setdefault("calibrate", []).append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            m = mods["quality"].measure(cal.image, mask=cal.mask)
            t.setdefault("measure", []).append(time.perf_counter() - t0)
            reg = mods["register"]
            if label not in grids:
                grids[label] = reg.make_grid((n, n), m.stars)
            grid = grids[label]
            t0 = time.perf_counter()
            al = reg.align(m.stars, grid, frame_shape=(n, n)) if i else reg.reference_alignment(
                grid)
            t.setdefault("align", []).append(time.perf_counter() - t0)
            kw = {"repaired": True} if label == "new" else {}
            t0 = time.perf_counter()
            img, w = reg.warp(cal.image, al, grid, mask=cal.mask, **kw)
            t.setdefault("warp", []).append(time.perf_counter() - t0)
            st = mods["stack"]
            t0 = time.perf_counter()
            per_second = img / np.float32(60.0)
            sky = st.fit_sky(per_second)
            fi = st.FrameInput(per_second, sky_rms=sky.rms, exptime=60.0, fwhm=3.0,
                               frame_id=i, coverage=w, scale=1.0, sky=sky.map())
            t.setdefault("sky fit + map", []).append(time.perf_counter() - t0)
            if label not in coadds:
                coadds[label] = st.RunningCoadd(grid.shape, warmup=3)
            t0 = time.perf_counter()
            coadds[label].add(fi)
            t.setdefault("coadd add", []).append(time.perf_counter() - t0)
    print(f"{n} px, median over frames 5..{len(frames)} (coadd past its warm-up), ms:")
    print(f"  {'stage':<14} {'old':>7} {'new':>7}")
    tot = {"old": 0.0, "new": 0.0}
    for stage in times["old"]:
        row = {lab: statistics.median(times[lab][stage][4:]) for lab in ("old", "new")}
        for lab in tot:
            tot[lab] += row[lab]
        print(f"  {stage:<14} {1000 * row['old']:7.0f} {1000 * row['new']:7.0f}")
    print(f"  {'sum':<14} {1000 * tot['old']:7.0f} {1000 * tot['new']:7.0f}")


if __name__ == "__main__":
    main()
