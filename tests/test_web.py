"""The dome page: a real uvicorn server on 127.0.0.1, driven by a real headless Chromium.

One small simulated night is processed once for the module; the last light is held back
and processed while the page is open, to see it arrive without a reload. Chromium is
driven through the DevTools protocol (``websocket-client``), so the test can read the
live DOM, the Performance timings and take screenshots. Screenshots of day and night
mode go to ``$OBSERVD_TEST_ARTIFACTS`` (default ``tests/artifacts/``, git-ignored).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import subprocess
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from observd.catalog import Catalog
from observd.config import load_config
from observd.ingest import find_frame_files, in_time_order
from observd.pipeline import Pipeline
from observd.simulate import CameraModel, NightPlan, simulate_night
from observd.status import FRAME_KEYS
from observd.web import WebServer
from observd.web.data import QUALITY_KEYS
from tests.cdp import CHROMIUM, Browser
from tests.conftest import REPO, write_config

ARTIFACTS = Path(os.environ.get("OBSERVD_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))
NIGHT = "2026-03-14"
PLAN = NightPlan(night=NIGHT, n_bias=5, n_dark=3, dark_exptimes=(60.0,), n_flat=3, n_light=3,
                 targets=("M 51",), meridian_flip=False)  # fmt: skip
SECRET = "secret outside the products folder"
IMGS = "[...document.querySelectorAll('main img')]"  # the page's pictures (not the viewer's)
ALL_LOADED = IMGS + ".every(i => i.complete && i.naturalWidth > 0)"


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """A processed night, minus its last light (kept for the live test)."""
    folder = tmp_path_factory.mktemp("dome")
    truth = simulate_night(folder / "sim", PLAN, CameraModel(size=256))
    config = load_config(write_config(folder, incoming=str(truth.camera_dir)))
    paths = in_time_order(find_frame_files([truth.camera_dir], config), config)
    last_light = max(i for i, p in enumerate(paths) if "M51-" in p.name)
    held = paths.pop(last_light)
    with Catalog(config.paths.catalog) as catalog:
        pipeline = Pipeline(config, catalog)
        for path in paths:
            pipeline.process(path)
        pipeline.finish()
    # things the page must never serve
    (folder / "outside").mkdir()
    (folder / "outside" / "secret.png").write_text(SECRET)
    products = config.paths.products
    (products / "escape.png").symlink_to(folder / "outside" / "secret.png")
    (products / "linkdir").symlink_to(folder / "outside", target_is_directory=True)
    return {"config": config, "folder": folder, "truth": truth, "held": held}


@pytest.fixture(scope="module")
def server(night):
    web = WebServer(night["config"], port=0).start()
    yield web
    web.stop()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: apt-get install -y chromium")
    pytest.importorskip("websocket", reason="websocket-client is needed to drive chromium")
    b = Browser()
    yield b
    b.close()


def _get(server: WebServer, target: str) -> tuple[int, bytes, str]:
    """A raw GET: the target goes on the wire exactly as written (no normalisation)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("Content-Type") or ""
    finally:
        conn.close()


# ---------------------------------------------------------------------------- the page


def test_page_shows_the_night_stacks_and_colour_and_every_image_loads(night, server, browser):
    with Catalog(night["config"].paths.catalog, readonly=True) as catalog:
        coadds = list(catalog.db["coadds"].rows_where("night = ?", [NIGHT]))
    assert len(coadds) == 3  # R, V, B of M 51
    browser.open(server.url)
    cold = browser.js(
        "(() => { const n = performance.getEntriesByType('navigation')[0];"
        " const r = performance.getEntriesByType('resource').map(e => [e.name.split('/')[3],"
        " Math.round(e.duration)]); return [Math.round(n.responseEnd),"
        " Math.round(n.domContentLoadedEventEnd), Math.round(n.loadEventEnd), r]; })()"
    )
    print(f"\ncold browser, first page: html {cold[0]} ms, DOM {cold[1]} ms, load {cold[2]} ms;"
          f" resources {cold[3]}")  # fmt: skip
    assert browser.js("document.title") == f"observd · {NIGHT}"
    stacks = browser.js("[...document.querySelectorAll('[data-stack]')].map(e => e.dataset.title)")
    assert sorted(stacks) == sorted(f"{c['target']} {c['filter']}" for c in coadds)
    assert browser.js("document.querySelectorAll('.composite img').length") == 1
    loaded = browser.wait_for(ALL_LOADED, 10)
    assert loaded is not None, browser.js(IMGS + ".filter(i => !i.naturalWidth).map(i => i.src)")
    images = browser.js(IMGS + ".map(i => new URL(i.src).pathname)")
    assert sum(p.startswith("/products/stacks/") for p in images) == 4  # 3 stacks + colour
    assert any(p.startswith("/frame/") for p in images)  # the latest frame
    text = browser.js("document.body.innerText")
    for c in coadds:  # frames used per stack, as the catalog says
        n = c["n_frames"]
        assert f"{n} frame{'' if n == 1 else 's'} ·" in text
    assert "Timeline" in text and browser.js("document.querySelectorAll('svg circle').length")
    # every light's verdict on the page agrees with the simulator's truth
    frames = json.loads(_get(server, f"/api/frames?night={NIGHT}")[1])["frames"]
    by_name = {Path(f["path"]).name: f for f in frames}
    for f in night["truth"].files:
        if f.type == "light" and Path(f.path).name in by_name:
            got = by_name[Path(f.path).name]["status"]
            assert (got == "rejected") == f.expected.startswith("rejected"), (f.path, got)


def test_page_weight_and_render_time(server, browser):
    browser.call("Network.enable")
    browser.call("Network.setCacheDisabled", cacheDisabled=True)  # everything fetched again
    try:
        browser.open(server.url)
        assert browser.wait_for(ALL_LOADED, 10) is not None
        load_ms = browser.js("performance.getEntriesByType('navigation')[0].loadEventEnd")
        fetched = browser.js("performance.getEntriesByType('resource').length")
    finally:
        browser.call("Network.setCacheDisabled", cacheDisabled=False)
        browser.call("Network.disable")
    assert fetched >= 6  # style, script, latest frame, three stacks, colour
    urls = browser.js(
        "[location.href, ...performance.getEntriesByType('resource').map(e => e.name)]"
    )
    total = 0
    for url in set(urls):
        path = url.split(str(server.port), 1)[1]
        if path.startswith("/events"):
            continue  # the live stream never ends
        status, body, _ = _get(server, path)
        assert status == 200, path
        total += len(body)
    print(f"\npage: {len(set(urls))} resources, {total / 1024:.0f} KiB, load {load_ms:.0f} ms")
    assert total < 2 * 2**20
    assert 0 < load_ms < 1000


def test_a_new_frame_appears_without_reload_within_two_seconds(night, server, browser):
    browser.open(server.url)
    assert browser.wait_for("document.getElementById('live').classList.contains('on')", 5)
    browser.js("window.__same_page = 42")
    held = night["held"]
    assert browser.js("document.getElementById('latest-name').textContent") != held.name
    took = {}

    def process() -> None:  # the pipeline's own thread, as in the daemon
        with Catalog(night["config"].paths.catalog) as catalog:
            pipeline = Pipeline(night["config"], catalog)
            t0 = time.time()
            pipeline.process(held)
            took["process"] = time.time() - t0
            took["first_seen"] = catalog.frame_by_path(held.absolute())["first_seen"]
            pipeline.finish()

    worker = threading.Thread(target=process)
    worker.start()
    try:
        seen_after = browser.wait_for(
            f"document.getElementById('latest-name').textContent === {json.dumps(held.name)}", 10
        )
        seen = time.time()
    finally:
        worker.join(60)
    assert seen_after is not None, "the new frame never appeared"
    delay = seen - datetime.fromisoformat(took["first_seen"]).timestamp()
    print(f"\nlive: frame recorded -> on the page in {delay:.2f} s "
          f"(processing took {took['process']:.2f} s)")  # fmt: skip
    assert delay < 2.0
    assert browser.js("window.__same_page") == 42  # no reload
    assert held.name in browser.js("document.querySelector('.recent').innerText")


def test_the_page_reconnects_after_a_server_restart(night, server, browser):
    browser.open(server.url)
    assert browser.wait_for("document.getElementById('live').classList.contains('on')", 5)
    browser.js("window.__same_page = 7")
    port = server.port
    server.stop()
    assert browser.wait_for("document.getElementById('live').classList.contains('off')", 5)
    server.port = port
    server.start()
    took = browser.wait_for("document.getElementById('live').classList.contains('on')", 10)
    assert took is not None, "the page did not reconnect"
    assert browser.js("window.__same_page") == 7


def test_day_and_night_mode_screenshots(night, server, browser):
    browser.open(server.url)
    assert browser.wait_for(ALL_LOADED, 10) is not None
    assert not browser.js("document.documentElement.classList.contains('night')")
    day = browser.screenshot(ARTIFACTS / "dome_day.png")
    browser.js("document.querySelector('.a-timeline').scrollIntoView()")
    browser.screenshot(ARTIFACTS / "dome_day_timeline.png")
    browser.js("window.scrollTo(0, 0)")
    browser.open(server.url + "?mode=night")
    assert browser.js("document.documentElement.classList.contains('night')")
    assert browser.wait_for(ALL_LOADED, 10) is not None
    assert browser.js("getComputedStyle(document.body).backgroundColor") == "rgb(0, 0, 0)"
    assert browser.js("getComputedStyle(document.body).color") == "rgb(255, 0, 0)"
    # large type: legible across the dome
    assert float(browser.js("parseFloat(getComputedStyle(document.body).fontSize)")) >= 20
    nightshot = browser.screenshot(ARTIFACTS / "dome_night.png")
    # remembered without the URL parameter; the button switches back
    browser.open(server.url)
    assert browser.js("document.documentElement.classList.contains('night')")
    browser.js("document.getElementById('mode').click()")
    assert not browser.js("document.documentElement.classList.contains('night')")
    assert browser.js("localStorage.getItem('observd-mode')") == "day"
    # the stack viewer: click a stack, change the stretch, the picture is re-made
    browser.js("document.querySelector('[data-stack]').click()")
    assert browser.wait_for("document.getElementById('viewer-img').naturalWidth > 0", 10)
    browser.js("const s = document.getElementById('viewer-stretch'); s.value = 'linear';"
               "s.dispatchEvent(new Event('change'))")  # fmt: skip
    assert browser.wait_for(
        "document.getElementById('viewer-img').src.includes('stretch=linear') &&"
        "document.getElementById('viewer-img').complete &&"
        "document.getElementById('viewer-img').naturalWidth > 0",
        10,
    )
    browser.screenshot(ARTIFACTS / "dome_viewer.png")
    from PIL import Image

    with Image.open(nightshot) as img:  # pure red on black: no green or blue anywhere
        rgb = img.convert("RGB")
        _, g, b = (band.getextrema()[1] for band in rgb.split())
        assert g <= 8 and b <= 8, (g, b)
    with Image.open(day) as img:
        assert img.size == (1920, 1080)


# ---------------------------------------------------------------------------- safety

TRAVERSALS = [
    "/products/../observd.toml",
    "/products/..%2fobservd.toml",
    "/products/..%2Fobservd.sqlite",
    "/products/%2e%2e/observd.toml",
    "/products/%2E%2E%2Fobservd.toml",
    "/products/%252e%252e/observd.toml",  # double-encoded ..
    "/products/%252e%252e%252fobservd.toml",
    "/products/stacks/..%2f..%2f..%2foutside%2fsecret.png",
    "/products//etc/passwd",
    "/products/%2fetc%2fpasswd",
    "/products/%2Fetc%2Fhostname",
    "/products/stacks\\..\\..\\outside\\secret.png",
    "/products/..%5c..%5coutside%5csecret.png",
    f"/products/stacks/{NIGHT}/m51/m51_R.png%00.txt",
    f"/products/stacks/{NIGHT}/m51/m51_R.png%00",
    "/products/escape.png",  # a symlink out of the products folder
    "/products/linkdir/secret.png",  # a symlinked folder out of it
    "/products/state/coadd_1.npz",  # not a product for people
    "/products/",
    "/static/../observd.toml",
    "/static/..%2f..%2fapp.py",
    "/static/%2e%2e/app.py",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/../../etc/passwd",
]

MALFORMED = [
    "/?night=2026-13-45",
    "/?night=tomorrow",
    "/?night=2026-03-14%00",
    "/?mode=purple",
    "/parts?night=..%2f..",
    "/events?night=14-03-2026",
    "/api/status?night=2026-3-14",
    "/api/frames?night=%27%3Bdrop%20table%20frames",
    "/stack/1.png?stretch=evil",
    "/stack/1.png?q=nan",
    "/stack/1.png?q=5",
    "/stack/1.png?w=0",
    "/frame/1.png?w=-3",
    "/frame/1.png?w=abc",
    f"/products/stacks/{NIGHT}/m51/m51_R.png?w=100000",
    f"/products/stacks/{NIGHT}/m51/m51_R.fits?w=100",
]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_traversal_is_refused(night, server, target):
    status, body, _ = _get(server, target)
    assert status == 404, (target, status, body[:200])
    assert SECRET.encode() not in body and b"[paths]" not in body and b"root:" not in body


@pytest.mark.parametrize("target", MALFORMED)
def test_malformed_requests_get_400(night, server, target):
    status, body, _ = _get(server, target)
    assert status == 400, (target, status, body[:200])
    assert body.startswith(b"bad request: ")


def test_products_and_api(night, server):
    status, body, ctype = _get(server, f"/products/stacks/{NIGHT}/m51/m51_R.png")
    assert status == 200 and ctype == "image/png" and body[:8] == b"\x89PNG\r\n\x1a\n"
    status, thumb, ctype = _get(server, f"/products/stacks/{NIGHT}/m51/m51_R.png?w=64")
    assert status == 200 and ctype == "image/jpeg" and len(thumb) < len(body)
    from PIL import Image

    assert Image.open(io.BytesIO(thumb)).size[0] == 64
    status, body, ctype = _get(server, f"/products/stacks/{NIGHT}/m51/m51_R.fits")
    assert status == 200 and body.startswith(b"SIMPLE  =")
    asinh = _get(server, "/stack/1.png?stretch=asinh&q=0.1")
    linear = _get(server, "/stack/1.png?stretch=linear")
    assert asinh[0] == linear[0] == 200 and asinh[1] != linear[1]
    assert _get(server, "/stack/999.png")[0] == 404
    assert _get(server, "/frame/99999.png")[0] == 404

    with Catalog(night["config"].paths.catalog, readonly=True) as catalog:
        frames = catalog.frames("night = ?", [NIGHT])
        lights = {r["frame_id"]: r for r in catalog.lights()}
        coadds = list(catalog.db["coadds"].rows)
    light_id = min(lights)
    status, body, ctype = _get(server, f"/frame/{light_id}.png?w=100")
    assert status == 200 and ctype == "image/png" and Image.open(io.BytesIO(body)).size[0] == 100
    status, body, ctype = _get(server, f"/frame/{light_id}.jpg")
    assert status == 200 and ctype == "image/jpeg" and body[:3] == b"\xff\xd8\xff"
    status, body, ctype = _get(server, f"/api/frames?night={NIGHT}")
    assert status == 200 and ctype == "application/json"
    api = json.loads(body)["frames"]
    assert len(api) == len(frames)
    for entry in api:
        assert set(FRAME_KEYS) | set(QUALITY_KEYS) <= set(entry)
        if entry["id"] in lights:
            assert entry["fwhm"] == pytest.approx(lights[entry["id"]]["fwhm"])
            assert entry["verdict"] == lights[entry["id"]]["verdict"]
    assert json.loads(_get(server, "/api/frames?night=2020-01-01")[1])["frames"] == []

    status_data = json.loads(_get(server, "/api/status")[1])
    assert status_data["night"] == NIGHT and status_data["frames"] == len(frames)
    assert {s["id"] for s in status_data["stacks"]} == {c["id"] for c in coadds}
    assert all(s["noise"] > 0 and s["exptime"] > 0 for s in status_data["stacks"])
    assert status_data["daemon"]["up"] is False
    assert "not running" in status_data["daemon"]["reason"]


def test_daemon_health_follows_the_state_file(night, server):
    state = night["config"].paths.products / "state" / "daemon.json"
    now = datetime.now(UTC)
    body = {"pid": 1, "started": now.isoformat(), "updated": now.isoformat(),
            "state": "running", "queue": 3, "in_hand": None, "processed": 10, "failed": 0,
            "last_event": {"time": now.isoformat(), "path": "/x/M51-001R.fit", "what": "stacked"},
            "watcher": {"roots": [{"path": "/x", "mode": "polling"}],
                        "roots_missing": ["/mnt/camera"]},
            "disk_free": {"/": 123 * 2**30}, "night": NIGHT}  # fmt: skip
    try:
        state.write_text(json.dumps(body))
        daemon = json.loads(_get(server, "/api/status")[1])["daemon"]
        assert daemon["up"] is True and daemon["queue"] == 3
        assert daemon["watcher_mode"] == "polling"
        page = _get(server, "/")[1].decode()
        assert "running" in page and "123.0 GiB" in page and "polling" in page
        assert "camera folder missing: /mnt/camera" in page
        body["updated"] = (now - timedelta(seconds=60)).isoformat()
        state.write_text(json.dumps(body))
        daemon = json.loads(_get(server, "/api/status")[1])["daemon"]
        assert daemon["up"] is False and "stale" in daemon["reason"]
        state.write_text("{not json")
        daemon = json.loads(_get(server, "/api/status")[1])["daemon"]
        assert daemon["up"] is False and "unreadable" in daemon["reason"]
    finally:
        state.unlink(missing_ok=True)


def test_observd_serve_runs_in_the_foreground(night, capsys):
    import signal
    import socket
    import sys

    with socket.socket() as s:  # a free port (a race with other tests is unlikely)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = str(night["folder"] / "observd.toml")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    from observd.cli import main

    assert main(["serve", "--config", config, "--port", "70000"]) == 2  # refused, not served
    assert "--port must be within 0..65535" in capsys.readouterr().err
    proc = subprocess.Popen(
        [sys.executable, "-m", "observd", "serve", "-q", "--config", config, "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    page = r.read().decode()
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "observd serve never answered"
                time.sleep(0.2)
        assert f"<title>observd · {NIGHT}</title>" in page
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert f"http://127.0.0.1:{port}/" in out
    assert proc.returncode in (0, 130), err


def test_before_the_first_frame_the_page_says_so(tmp_path):
    """No catalog yet (a fresh install): the page, the API and the stream still answer."""
    config = load_config(write_config(tmp_path))
    with WebServer(config, port=0) as web:
        status, body, _ = _get(web, "/")
        assert status == 200 and b"no catalog yet" in body and b"no frame yet" in body
        status, body, _ = _get(web, "/api/status")
        assert status == 200 and json.loads(body)["stacks"] == []
        assert json.loads(_get(web, "/api/frames")[1]) == {"night": None, "frames": []}
        assert _get(web, "/products/stacks/x.png")[0] == 404  # no products folder either
        Catalog(config.paths.catalog).close()  # an empty catalog
        status, body, _ = _get(web, f"/?night={NIGHT}")
        assert status == 200 and b"no stack yet" in body


def test_image_cache_is_bounded_and_makes_each_picture_once():
    from observd.web.images import ImageCache

    cache = ImageCache(size=10, max_bytes=10)
    for key in "abc":
        assert cache.get(key, lambda k=key: k.encode() * 6) == key.encode() * 6
    assert "c" in cache and "a" not in cache and "b" not in cache  # 18 bytes > 10
    calls = []

    def slow() -> bytes:
        calls.append(1)
        time.sleep(0.2)
        return b"picture"

    threads = [threading.Thread(target=cache.get, args=("p", slow)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and cache.get("p", slow) == b"picture"


def test_the_daemon_box_follows_the_daemon_live(night, server, browser):
    state = night["config"].paths.products / "state" / "daemon.json"
    browser.open(server.url)
    assert browser.wait_for("document.getElementById('live').classList.contains('on')", 5)
    pill = "document.querySelector('[data-part=daemon] .pill').textContent"
    assert browser.js(pill) == "down"
    now = datetime.now(UTC).isoformat()
    try:
        state.write_text(json.dumps({"pid": 1, "started": now, "updated": now,
                                     "state": "running", "queue": 0, "processed": 5,
                                     "failed": 0, "night": NIGHT}))  # fmt: skip
        up = browser.wait_for(f"{pill} === 'running'", 10)
    finally:
        state.unlink(missing_ok=True)
    down = browser.wait_for(f"{pill} === 'down'", 10)
    print(f"\ndaemon box: running after {up} s, down after {down} s")
    assert up is not None and down is not None, "the daemon box missed an update"
    assert up < 2 and down < 2


def test_parts_changed_while_rendered_carry_no_signature(night):
    """A state file written while /parts renders, then removed again (A -> B -> A): the
    stream's signature is A's again, so parts labelled A but showing B would stay on the
    page for good (seen under load: the daemon box never went back to "down"). Parts
    whose state changed while they were made carry no signature: the page asks again."""
    from starlette.requests import Request

    from observd.web.app import _sig_hash, create_app

    dome = create_app(night["config"]).state.dome
    state = night["config"].paths.products / "state" / "daemon.json"
    request = Request({"type": "http", "method": "GET", "path": "/parts", "query_string": b"",
                       "headers": []})  # fmt: skip
    render = dome.view
    before = _sig_hash(dome.signature(None))

    def view_while_the_daemon_starts(n, **kw):
        now = datetime.now(UTC).isoformat()
        state.write_text(json.dumps({"pid": 1, "started": now, "updated": now,
                                     "state": "running", "queue": 0, "processed": 5,
                                     "failed": 0, "night": NIGHT}))  # fmt: skip
        return render(n, **kw)

    try:
        dome.view = view_while_the_daemon_starts
        changed = json.loads(dome.parts_json(request).body)
    finally:
        dome.view = render
        state.unlink(missing_ok=True)
    assert '"pill up">running<' in changed["parts"]["daemon"]  # the newer state, shown
    assert changed["sig"] is None  # but not labelled with the older signature
    assert _sig_hash(dome.signature(None)) == before  # A again: the premise of the bug
    settled = json.loads(dome.parts_json(request).body)
    assert settled["sig"] == before and '"pill down">down<' in settled["parts"]["daemon"]


def test_the_event_stream_repeats_the_signature_the_parts_carry(night, server):
    """A page that fetched its parts between two polls converges: every event carries the
    signature, and /parts says which signature it was rendered at."""
    parts = json.loads(_get(server, "/parts")[1])
    assert set(parts["parts"]) >= {"latest", "stacks", "composites", "timeline", "daemon"}
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    conn.request("GET", "/events")
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    events, t0 = [], time.monotonic()
    while not (len(events) >= 2 and len(events[1]) == 2) and time.monotonic() - t0 < 5:
        line = response.fp.readline().decode()
        if line.startswith("event: "):
            events.append([line[7:].strip()])
        elif line.startswith("data: ") and events:
            events[-1].append(json.loads(line[6:]))
    conn.close()
    assert [e[0] for e in events] == ["hello", "state"]
    assert events[0][1]["sig"] == events[1][1]["sig"] == parts["sig"]
    assert events[0][1]["night"] == NIGHT
