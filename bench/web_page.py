"""The dome page on a bigger night: page weight, render time, live latency, image costs.

Usage: PYTHONPATH=. python bench/web_page.py [--size 2048] [--lights 6]

Simulates a night (two targets, three filters), processes it with the real pipeline
except its last light, serves it with :class:`observd.web.WebServer` and loads it in a
fresh headless Chromium (``/usr/bin/chromium``). Prints: the cold page load
(``loadEventEnd``) and its weight (every resource fetched again and counted), the cost of
``/parts`` (what each live update re-renders), the first render of the latest frame
(cold cache), and the delay from the held-back light being recorded in the catalog to
its name appearing on the page.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from observd.catalog import Catalog
from observd.config import config_from_dict
from observd.ingest import find_frame_files, in_time_order
from observd.logs import setup_logging
from observd.pipeline import Pipeline
from observd.simulate import CameraModel, NightPlan, simulate_night
from observd.web import WebServer
from tests.cdp import Browser


def _get(port: int, target: str) -> tuple[int, bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t0 = time.perf_counter()
    conn.request("GET", target)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--lights", type=int, default=6, help="per target and filter")
    args = parser.parse_args()
    setup_logging("WARNING")
    with tempfile.TemporaryDirectory(prefix="observd-bench-web-") as tmp:
        folder = Path(tmp)
        plan = NightPlan(n_bias=5, n_dark=3, dark_exptimes=(60.0,), n_flat=3,
                         n_light=args.lights)  # fmt: skip
        t0 = time.monotonic()
        truth = simulate_night(folder / "sim", plan, CameraModel(size=args.size),
                               truth_images=False)  # fmt: skip
        config = config_from_dict(
            {
                "paths": {
                    "products": str(folder / "p"),
                    "catalog": str(folder / "o.sqlite"),
                    "incoming": [str(truth.camera_dir)],
                },
                "site": {"timezone": truth.plan.timezone},
            }  # fmt: skip
        )
        paths = in_time_order(find_frame_files([truth.camera_dir], config), config)
        lights = {truth.path(f).absolute() for f in truth.files if f.type == "light"}
        held = paths.pop(max(i for i, p in enumerate(paths) if p.absolute() in lights))
        with Catalog(config.paths.catalog) as catalog:
            pipeline = Pipeline(config, catalog)
            for path in paths:
                pipeline.process(path)
            pipeline.finish()
        print(f"night: {len(paths)} files of {args.size} px processed in "
              f"{time.monotonic() - t0:.0f} s; held back {held.name}")  # fmt: skip

        server = WebServer(config, port=0).start()
        browser = Browser()
        try:
            t = time.perf_counter()
            browser.open(server.url, timeout=60)
            wall = time.perf_counter() - t
            browser.wait_for("[...document.querySelectorAll('main img')].every(i => i.complete)",
                             30)  # fmt: skip
            load_ms = browser.js("performance.getEntriesByType('navigation')[0].loadEventEnd")
            urls = set(browser.js("[location.href, ...performance.getEntriesByType('resource')"
                                  ".map(e => e.name)]"))  # fmt: skip
            sizes = {}
            for url in urls:
                path = url.split(str(server.port), 1)[1]
                if not path.startswith("/events"):
                    sizes[path] = len(_get(server.port, path)[1])
            print(f"cold page load (fresh browser, server just started): loadEventEnd "
                  f"{load_ms:.0f} ms (navigate+ready {wall:.2f} s)")  # fmt: skip
            print(f"page weight: {sum(sizes.values()) / 1024:.0f} KiB in {len(sizes)} resources;"
                  f" largest {max(sizes.values()) / 1024:.0f} KiB "
                  f"({max(sizes, key=sizes.get).split('?')[0]})")  # fmt: skip
            parts = [_get(server.port, "/parts")[2] for _ in range(5)]
            print(f"/parts (one live update): median {1000 * statistics.median(parts):.0f} ms")
            status = json.loads(_get(server.port, "/api/status")[1])
            frame_id = status["latest"]["id"]
            cold = _get(server.port, f"/frame/{frame_id}.jpg?w=901")[2]
            warm = _get(server.port, f"/frame/{frame_id}.jpg?w=901")[2]
            print(f"latest frame picture: first render {1000 * cold:.0f} ms, cached "
                  f"{1000 * warm:.1f} ms")  # fmt: skip
            stack_id = status["stacks"][0]["id"]
            restretch = _get(server.port, f"/stack/{stack_id}.png?stretch=asinh&q=0.3")[2]
            print(f"stack re-stretch (viewer): {1000 * restretch:.0f} ms")

            took: dict[str, object] = {}

            def process() -> None:  # the pipeline in its own thread, as in the daemon
                with Catalog(config.paths.catalog) as catalog:
                    pipeline = Pipeline(config, catalog)
                    t0 = time.time()
                    pipeline.process(held)
                    took["process"] = time.time() - t0
                    took["first_seen"] = catalog.frame_by_path(held.absolute())["first_seen"]
                    pipeline.finish()

            worker = threading.Thread(target=process)
            worker.start()
            after = browser.wait_for(
                f"document.getElementById('latest-name').textContent === '{held.name}'", 30
            )
            seen = time.time()
            worker.join()
            if after is None:
                print("live: the held-back light did not appear within 30 s")
            else:
                recorded = datetime.fromisoformat(str(took["first_seen"])).timestamp()
                print(f"live: recorded -> on the page in {seen - recorded:.2f} s (its "
                      f"processing took {took['process']:.1f} s)")  # fmt: skip
            t = time.perf_counter()
            browser.open(server.url, timeout=60)
            load_ms = browser.js("performance.getEntriesByType('navigation')[0].loadEventEnd")
            print(f"warm page load (same browser, after the update): loadEventEnd {load_ms:.0f} ms")
        finally:
            browser.close()
            server.stop()


if __name__ == "__main__":
    main()
