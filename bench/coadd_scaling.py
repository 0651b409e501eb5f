"""Does the 200th light cost what the 10th did? Peak memory after 200 lights vs after 20.

Usage: python bench/coadd_scaling.py [--size 1024] [--lights 200] [--keep DIR]

Simulates one target in one filter (``--lights`` lights, with cosmic rays, a satellite
and the usual cloudy / trailed / defocused frames, plus biases, darks and flats), then
feeds every frame through :class:`observd.pipeline.Pipeline` in time order in a *fresh*
process (so the peak RSS is the pipeline's, not the simulator's), and prints:

- the wall time of each light's ``Pipeline.process`` (calibrate, measure, align, judge,
  warp, stack, checkpoints, products), mean and median over lights 6-15 and over the
  last ten; the process's CPU time for the same (less sensitive to other jobs on a
  shared machine); the coadd stage alone (``Coadds.add``, publishing included) and its
  parts; the periodic parts (publish, checkpoint, colour picture) per event, the first
  three against the last three;
- the process's peak RSS (``ru_maxrss``) and current RSS after light 20 and after the
  last one, and the heap's blocks in use (the RSS is flat from the first frame, where
  the pipeline reserves its working memory: a leak would show in the heap in use).

Issue #7 (and #5's done-when) want light 200 <= 1.1 x light 10 and the peak RSS after
200 within 10 % of that after 20. The machine this was written on was shared by six
jobs on two cores: compare figures of one run, and rerun on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mb() -> tuple[float, float, float]:
    """(peak, current) resident set size of this process and the heap's blocks in use,
    MB. The pipeline reserves its working memory at the first frame, so the RSS is flat
    from there whatever happens below it; the heap in use is what a leak would grow."""
    from observd.memory import heap_in_use

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    current = peak
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            current = int(line.split()[1]) / 1024.0
    return peak, current, (heap_in_use() or 0) / 2**20


def simulate(out: Path, size: int, lights: int) -> None:
    from observd.simulate import CameraModel, NightPlan, simulate_night

    plan = NightPlan(
        targets=("M 51",), filters=("R",), n_light=lights, light_exptime=30.0,
        dark_exptimes=(30.0,), n_bias=9, n_dark=7, n_flat=7, meridian_flip=False,
        wcs="mixed", warm_dark=False,
    )  # fmt: skip
    simulate_night(out, plan, CameraModel(size=size), truth_images=False)


def run(out: Path) -> dict:
    """Feed the simulated night through the pipeline; the per-light figures."""
    from loguru import logger

    from observd.catalog import Catalog
    from observd.config import load_config
    from observd.ingest import find_frame_files, in_time_order
    from observd.pipeline import Pipeline

    logger.remove()
    (out / "observd.toml").write_text(
        f'[paths]\nincoming = ["{out / "sim" / "camera"}"]\nproducts = "{out / "products"}"\n'
        f'catalog = "{out / "observd.sqlite"}"\n[site]\ntimezone = "America/Los_Angeles"\n'
    )
    config = load_config(out / "observd.toml")
    catalog = Catalog(config.paths.catalog)
    pipeline = Pipeline(config, catalog)
    add = pipeline.coadds.add
    coadd_seconds: list[float] = []

    def timed_add(**kwargs):  # instrumentation: the coadd stage's own share
        t0 = time.perf_counter()
        try:
            return add(**kwargs)
        finally:
            coadd_seconds.append(time.perf_counter() - t0)

    pipeline.coadds.add = timed_add  # type: ignore[method-assign]
    parts: dict[str, list[float]] = {"publish": [], "checkpoint": [], "rgb": []}

    def timed(name: str, method):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                parts[name].append(time.perf_counter() - t0)

        return call

    for name in parts:
        method = getattr(pipeline.coadds, f"_{name}")
        setattr(pipeline.coadds, f"_{name}", timed(name, method))
    lights: list[dict] = []
    rss: dict[int, tuple[float, float]] = {}
    for path in in_time_order(find_frame_files(config.paths.incoming, config), config):
        n_before = len(coadd_seconds)
        parts_before = {k: len(v) for k, v in parts.items()}
        t0, c0 = time.perf_counter(), time.process_time()
        result = pipeline.process(path)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        if result is None:
            continue
        frame = catalog.frame(result.frame_id)
        if frame["type"] != "light":
            continue
        coadd = sum(coadd_seconds[n_before:])
        light = {"seconds": seconds, "cpu": cpu, "coadd": coadd, "status": frame["status"]}
        light |= {k: sum(v[parts_before[k] :]) for k, v in parts.items()}
        lights.append(light)
        if len(lights) in (20, 200) or len(lights) % 50 == 0:
            rss[len(lights)] = _rss_mb()
    rss[len(lights)] = _rss_mb()
    pipeline.finish()
    stacked = len(catalog.frames("type = 'light' and status = 'stacked'"))
    catalog.close()
    return {"lights": lights, "rss": rss, "stacked": stacked}


def _window(values: list[float], lo: int, hi: int) -> tuple[float, float]:
    import statistics

    part = values[lo - 1 : hi]
    return statistics.fmean(part), statistics.median(part)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--lights", type=int, default=200)
    parser.add_argument("--keep", type=Path, help="simulate into / reuse this folder")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:  # the fresh process that runs the pipeline
        print(json.dumps(run(args.worker)))
        return 0
    with tempfile.TemporaryDirectory(prefix="coadd_scaling_") as tmp:
        out = args.keep or Path(tmp)
        if not (out / "sim" / "camera").is_dir():
            t0 = time.perf_counter()
            simulate(out / "sim", args.size, args.lights)
            print(f"simulated {args.lights} lights of {args.size} px in "
                  f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
        for stale in ("observd.sqlite", "observd.sqlite-wal", "observd.sqlite-shm"):
            (out / stale).unlink(missing_ok=True)
        if (out / "products").exists():
            import shutil

            shutil.rmtree(out / "products")
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(out)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        figures = json.loads(proc.stdout.strip().splitlines()[-1])
    lights = figures["lights"]
    n = len(lights)
    total = [x["seconds"] for x in lights]
    coadd = [x["coadd"] for x in lights]
    early, late = (6, 15), (max(1, n - 9), n)
    print(f"{n} lights, {figures['stacked']} stacked, {args.size} px")
    cpu = [x["cpu"] for x in lights]
    named = [("light (whole pipeline)", total), ("light, CPU time", cpu), ("coadd stage", coadd)]
    named += [(f"  of which {k}", [x[k] for x in lights]) for k in ("publish", "checkpoint", "rgb")]
    named.append(("  fold (the rest)", [x["coadd"] - x["publish"] - x["checkpoint"] - x["rgb"]
                                        for x in lights]))  # fmt: skip
    for name, values in named:
        e_mean, e_med = _window(values, *early)
        l_mean, l_med = _window(values, *late)
        ratio = f"{l_mean / e_mean:.3f}" if e_mean > 0 else "-"
        print(f"{name:24s} lights {early[0]}-{early[1]}: mean {e_mean * 1000:7.1f} ms, "
              f"median {e_med * 1000:7.1f} ms | lights {late[0]}-{late[1]}: mean "
              f"{l_mean * 1000:7.1f} ms, median {l_med * 1000:7.1f} ms | late/early "
              f"(mean) {ratio}")  # fmt: skip
    for k in ("publish", "checkpoint", "rgb"):  # periodic: cost per event, first vs last
        events = [x[k] for x in lights if x[k] > 0]
        if len(events) >= 6:
            first, last = sum(events[:3]) / 3, sum(events[-3:]) / 3
            print(f"{k:10s} {len(events):3d} times: first three {first * 1000:7.1f} ms, "
                  f"last three {last * 1000:7.1f} ms, last/first {last / first:.3f}")  # fmt: skip
    rss = {int(k): v for k, v in figures["rss"].items()}
    for k in sorted(rss):
        print(f"after light {k:4d}: peak RSS {rss[k][0]:7.1f} MB, current {rss[k][1]:7.1f} MB, "
              f"heap in use {rss[k][2]:7.1f} MB")  # fmt: skip
    if 20 in rss:
        print(f"peak RSS after {n} / after 20: {rss[n][0] / rss[20][0]:.3f}; heap in use "
              f"{rss[n][2] / rss[20][2]:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
