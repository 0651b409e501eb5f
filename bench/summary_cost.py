"""What the morning summary costs: summary_data and write_summary on a processed night.

Usage: python bench/summary_cost.py [--size 1024] [--lights 10] [--repeat 3] [--keep DIR]

Simulates a night (two targets, R V B, ``--lights`` per target and filter), takes it
through the real pipeline once (or reuses ``--keep DIR`` if it already holds one), then
times :func:`observd.summary.summary_data` and :func:`observd.summary.write_summary`
(median of ``--repeat`` runs, in one process: the first write also pays the matplotlib
import, reported apart) and prints the page's size.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from observd.catalog import Catalog
from observd.config import config_from_dict
from observd.ingest import find_frame_files, in_time_order
from observd.logs import setup_logging
from observd.pipeline import Pipeline
from observd.simulate import CameraModel, NightPlan, simulate_night
from observd.summary import summary_data, write_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--lights", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", metavar="DIR", help="work here (reused when it has a night)")
    args = parser.parse_args()
    setup_logging("WARNING")
    folder = Path(args.keep or tempfile.mkdtemp(prefix="observd-bench-summary-"))
    plan = NightPlan(n_light=args.lights)
    config = config_from_dict(
        {
            "paths": {"products": str(folder / "p"), "catalog": str(folder / "o.sqlite")},
            "site": {"timezone": plan.timezone, "latitude": plan.latitude,
                     "longitude": plan.longitude},
        }  # fmt: skip
    )
    if not config.paths.catalog.exists():
        t0 = time.perf_counter()
        simulate_night(folder / "sim", plan, CameraModel(size=args.size))
        with Catalog(config.paths.catalog) as cat:
            pipeline = Pipeline(config, cat)
            for path in in_time_order(find_frame_files([folder / "sim" / "camera"], config),
                                      config):  # fmt: skip
                pipeline.process(path)
            pipeline.finish()
        print(f"night simulated and processed in {time.perf_counter() - t0:.0f} s ({folder})")
    with Catalog(config.paths.catalog, readonly=True) as cat:
        t0 = time.perf_counter()
        index = write_summary(config, cat, plan.night)
        first = time.perf_counter() - t0
        data_t, write_t = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            data = summary_data(config, cat, plan.night)
            data_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            write_summary(config, cat, plan.night)
            write_t.append(time.perf_counter() - t0)
    lights = data["totals"]["lights"]
    print(f"{args.size} px, {lights} lights, {len(data['targets'])} targets")
    print(f"first write_summary (imports matplotlib): {first:.2f} s")
    print(f"summary_data: median {statistics.median(data_t):.2f} s over {args.repeat}")
    print(f"write_summary: median {statistics.median(write_t):.2f} s over {args.repeat}")
    size = (index.parent / "summary.json").stat().st_size
    print(f"index.html {index.stat().st_size / 1e6:.2f} MB, summary.json {size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
