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
