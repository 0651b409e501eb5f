"""keep_freed_memory: a freed frame-sized array is reused without page faults."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from observd.memory import keep_freed_memory
    ok = keep_freed_memory() if sys.argv[1] == "keep" else None
    faults = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.empty((4096, 4096), np.float32)  # 64 MB, one 4096 px frame
        a.fill(1.0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del a
    print(json.dumps({"ok": ok, "faults": faults}))
""")


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, timeout=120)  # fmt: skip
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_frame_memory_is_reused_without_page_faults():
    plain = _probe("plain")
    kept = _probe("keep")
    assert kept["ok"] is True
    # without the setting every 64 MB array is a fresh mapping, faulted in again every
    # time (16k faults of 4 KiB pages, or ~500 with transparent huge pages, each of
    # which may stall on compaction)
    assert min(plain["faults"][1:]) >= 0.5 * plain["faults"][0] > 100, plain
    # with it the second and later arrays reuse the first one's pages
    assert kept["faults"][0] > 100, kept  # the first one is faulted in once
    assert max(kept["faults"][1:]) < 0.05 * kept["faults"][0], kept


_RESERVE_PROBE = textwrap.dedent("""
    import json, resource, sys, threading
    import numpy as np
    from observd.memory import heap_bytes, keep_freed_memory, reserve_heap
    keep_freed_memory()
    total = int(sys.argv[1])
    added = reserve_heap(total)
    after = heap_bytes()
    faults = {}

    def frames(name, n):  # frame-sized arrays up to most of the reserve, kept at once
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        keep = [np.ones((2048, 2048), np.float32) for _ in range(n)]
        faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        del keep

    frames("main", 16)
    worker = threading.Thread(target=frames, args=("thread", 16))
    worker.start()
    worker.join()
    print(json.dumps({"added": added, "after": after, "faults": faults}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reserved_heap_serves_frames_without_page_faults_on_any_thread():
    # above 2 GiB: the kept heap must not be trimmed back at any size
    total = 2**31 + 256 * 2**20
    out = subprocess.run([sys.executable, "-c", _RESERVE_PROBE, str(total)],
                         capture_output=True, text=True, check=True, timeout=300)  # fmt: skip
    got = json.loads(out.stdout)
    assert got["added"] > 2**31, got
    assert got["after"] >= total, got
    # 16 arrays of 16 MB: 65k pages if they were fresh; a thread's large blocks come
    # from the same kept heap, not from an arena of its own that maps them afresh
    assert got["faults"]["main"] < 500, got
    assert got["faults"]["thread"] < 500, got


_PIPELINE_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from observd.catalog import Catalog
    from observd.config import config_from_dict
    from observd.ingest import find_frame_files, in_time_order
    from observd.memory import heap_bytes
    from observd.pipeline import NIGHT_BYTES_PER_PIXEL, Pipeline
    from observd.simulate import CameraModel, NightPlan, simulate_night
    work = Path(sys.argv[1])
    plan = NightPlan(n_bias=2, dark_exptimes=(), n_dark=0, filters=(), n_flat=0,
                     targets=(), n_light=0, defects=False)
    truth = simulate_night(work / "sim", plan, CameraModel(size=1024), truth_images=False)
    config = config_from_dict({"paths": {"products": str(work / "products"),
                                         "catalog": str(work / "o.sqlite")}})
    with Catalog(config.paths.catalog) as catalog:
        pipeline = Pipeline(config, catalog)
        before = heap_bytes()
        paths = list(in_time_order(find_frame_files([truth.camera_dir], config), config))
        pipeline.process(paths[0])
        first = (heap_bytes(), pipeline.reserve_seconds)
        pipeline.process(paths[1])
        second = pipeline.reserve_seconds
    print(json.dumps({"before": before, "first": first, "second": second,
                      "want": NIGHT_BYTES_PER_PIXEL * 1024 * 1024}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_pipeline_reserves_the_nights_memory_at_its_first_frame(tmp_path):
    out = subprocess.run([sys.executable, "-c", _PIPELINE_PROBE, str(tmp_path)],
                         capture_output=True, text=True, check=True, timeout=300)  # fmt: skip
    got = json.loads(out.stdout)
    assert got["before"] < got["want"], got  # the probe's frames are large enough to tell
    heap, seconds = got["first"]
    assert heap >= got["want"], got
    assert seconds > 0, got
    assert got["second"] == seconds, got  # once per frame size, not per frame
