"""`observd run` as a real process on temp folders: real watchdog observers, real signals,
real SQLite, real FITS files; nothing mocked.

Each daemon is started as ``python -m observd run`` so that SIGTERM, SIGHUP, SIGUSR1 and
``kill -9`` reach a process exactly as systemd's would.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from observd.catalog import Catalog
from observd.daemon import SystemdNotifier
from observd.simulate import CameraModel, NightPlan, simulate_night
from observd.status import read_daemon_state
from tests.conftest import REPO, write_config

FAST = (
    "[watch]\nsettle_seconds = 0.3\npoll_seconds = 0.2\nincomplete_seconds = 3.0\n"
    "[daemon]\nstate_seconds = 0.3\nrebuild_delay_seconds = 1.0\n"
    "finish_quiet_seconds = 3600.0\nserve_web = false\n"
)


# -- helpers ------------------------------------------------------------------------------


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class DaemonProcess:
    """``observd run`` in a child process, with its state file and log at hand."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.products = config.parent / "products"
        self.log = config.parent / "daemon.stderr"
        environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "observd", "run", "--config", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=environ,
            )

    def state(self) -> dict | None:
        state = read_daemon_state(self.products)
        return state if state.get("pid") == self.proc.pid else None

    def wait_running(self, timeout: float = 60.0) -> dict:
        def running():
            assert self.proc.poll() is None, self.stderr()
            s = self.state()
            return s if s and s["state"] == "running" else None

        return wait_until(running, timeout, "the daemon to start")

    def wait_idle(self, n_files: int, timeout: float = 120.0) -> dict:
        """Until the catalog holds ``n_files`` and nothing waits or is in hand."""

        def idle():
            assert self.proc.poll() is None, self.stderr()
            s = self.state()
            if not s or s["queue"] or s["in_hand"] or s["watcher"]["candidates"]:
                return None
            return s if count_frames(self.config) >= n_files else None

        return wait_until(idle, timeout, f"{n_files} files processed")

    def stop(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def count_frames(config: Path) -> int:
    try:
        with Catalog(config.parent / "observd.sqlite", readonly=True) as cat:
            return cat.db["frames"].count
    except Exception:  # not created yet
        return 0


def frames_by_name(config: Path) -> dict[str, dict]:
    with Catalog(config.parent / "observd.sqlite", readonly=True) as cat:
        return {Path(r["path"]).name: r for r in cat.frames()}


def ingest_events(config: Path) -> dict[int, int]:
    with Catalog(config.parent / "observd.sqlite", readonly=True) as cat:
        rows = cat.db.query(
            "select frame_id, count(*) as n from events where stage = 'ingest' group by frame_id"
        )
        return {r["frame_id"]: r["n"] for r in rows}


def bias_bytes(seed: int, size: int = 64, date: str = "2026-03-14T01:00:00") -> bytes:
    rng = np.random.default_rng(seed)
    data = (1000 + rng.normal(0, 10, (size, size))).astype(np.uint16)
    header = fits.Header()
    header["IMAGETYP"] = "Bias Frame"
    header["EXPTIME"] = 0.0
    header["DATE-OBS"] = date
    header["INSTRUME"] = "TestCam"
    header["CCD-TEMP"] = -10.0
    buffer = io.BytesIO()
    fits.PrimaryHDU(data, header).writeto(buffer)
    return buffer.getvalue()


def write_in_chunks(path: Path, data: bytes, chunks: int = 4, pause: float = 0.5) -> None:
    step = -(-len(data) // chunks)
    with open(path, "wb") as fh:
        for k in range(0, len(data), step):
            fh.write(data[k : k + step])
            fh.flush()
            if k + step < len(data):
                time.sleep(pause)


def sha256_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def night_files(tmp_path_factory) -> Path:
    """A small simulated night (256 px), written once, copied into each test's folder."""
    out = tmp_path_factory.mktemp("night") / "sim"
    plan = NightPlan(
        n_bias=5, n_dark=3, dark_exptimes=(60.0,), n_flat=4, filters=("R", "V"),
        targets=("M 51",), n_light=4, meridian_flip=False, warm_dark=False,
    )  # fmt: skip
    simulate_night(out, plan, CameraModel(size=256))
    return out / "camera"


# -- watching and processing -------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["inotify", "polling"])
def test_chunked_files_are_processed_once_and_never_half_read(tmp_path, mode):
    camera = tmp_path / "camera"
    camera.mkdir()
    early = [camera / f"bias_early_{i}.fits" for i in range(3)]
    for i, path in enumerate(early):  # present before the daemon starts
        path.write_bytes(bias_bytes(i, date=f"2026-03-14T01:0{i}:00"))
    config = write_config(tmp_path, extra=FAST.replace("[watch]\n", f'[watch]\nmode = "{mode}"\n'))
    daemon = DaemonProcess(config)
    daemon.wait_running()
    late = [camera / f"bias_late_{i}.fits" for i in range(6)]
    writers = [
        threading.Thread(
            target=write_in_chunks,
            args=(p, bias_bytes(10 + i, date=f"2026-03-14T02:0{i}:00")),
            kwargs={"pause": 0.6},
        )
        for i, p in enumerate(late)
    ]
    for w in writers:  # six files growing at once, each over ~2 s
        w.start()
    for w in writers:
        w.join()
    daemon.wait_idle(len(early) + len(late))
    assert daemon.stop() == 0
    rows = frames_by_name(config)
    assert sorted(rows) == sorted(p.name for p in early + late)
    for name, row in rows.items():
        assert row["status"] == "used", (name, row["status"], row["reason"])
        assert row["size"] == (camera / name).stat().st_size
    events = ingest_events(config)
    assert sorted(events.values()) == [1] * len(rows), events  # each exactly once
    state = read_daemon_state(tmp_path / "products")
    assert state["state"] == "stopped" and not state["alive"]


@pytest.mark.timeout(300)
def test_500_files_dropped_at_once_are_all_processed_in_bounded_memory(tmp_path):
    camera = tmp_path / "camera"
    camera.mkdir()
    config = write_config(tmp_path, extra=FAST)
    daemon = DaemonProcess(config)
    daemon.wait_running()
    staging = tmp_path / "staging"
    staging.mkdir()
    for i in range(500):
        minute, second = divmod(i, 60)
        date = f"2026-03-14T0{1 + minute // 60}:{minute % 60:02d}:{second:02d}"
        (staging / f"bias_{i:03d}.fits").write_bytes(bias_bytes(i, date=date))
    for path in sorted(staging.iterdir()):  # renames: all 500 appear within a blink
        os.replace(path, camera / path.name)

    rss: list[int] = []

    def processed(n: int):
        def check():
            s = daemon.state()
            rss.append(_rss_kb(daemon.proc.pid))
            return s and s["processed"] >= n

        return check

    wait_until(processed(100), 120, "100 files")
    rss_100 = max(rss)
    wait_until(processed(500), 240, "500 files")
    daemon.wait_idle(500)
    rss_500 = max(rss)
    peak = _hwm_kb(daemon.proc.pid)
    assert daemon.stop() == 0
    rows = frames_by_name(config)
    assert len(rows) == 500
    assert {r["status"] for r in rows.values()} == {"used"}
    # bounded: the queue holds paths, not frames; memory does not grow with the backlog
    assert rss_500 - rss_100 < 60_000, (rss_100, rss_500)
    assert peak < 600_000, peak


def _rss_kb(pid: int) -> int:
    return _proc_status(pid, "VmRSS")


def _hwm_kb(pid: int) -> int:
    return _proc_status(pid, "VmHWM")


def _proc_status(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@pytest.mark.timeout(180)
def test_bad_files_never_stop_the_daemon_and_each_is_reported(tmp_path):
    camera = tmp_path / "camera"
    camera.mkdir()
    config = write_config(tmp_path, extra=FAST)
    daemon = DaemonProcess(config)
    daemon.wait_running()
    good = bias_bytes(1)
    (camera / "truncated.fits").write_bytes(good[: len(good) // 2])
    (camera / "empty.fits").write_bytes(b"")
    (camera / "notes.fits").write_bytes(b"FocusMax log\r\nnot an image\r\n" * 50)
    header_only = io.BytesIO()
    fits.PrimaryHDU(header=fits.Header({"IMAGETYP": "Light Frame"})).writeto(header_only)
    (camera / "header_only.fits").write_bytes(header_only.getvalue())
    (camera / "weird.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 2850)
    # a file deleted while it settles
    half = camera / "deleted.fits"
    half.write_bytes(good[:3000])
    time.sleep(0.1)
    half.unlink()
    # a file that never stops growing (for longer than watch.incomplete_seconds)
    grower = camera / "growing.fits"
    stop_growing = threading.Event()

    def grow() -> None:
        with open(grower, "ab") as fh:
            while not stop_growing.is_set():
                fh.write(b"\0" * 2880)
                fh.flush()
                time.sleep(0.1)

    growing = threading.Thread(target=grow)
    growing.start()
    try:
        time.sleep(4.5)  # > incomplete_seconds: the watcher says so
        (camera / "good.fits").write_bytes(good)  # and the daemon is still at work
        wanted = {"truncated.fits", "empty.fits", "notes.fits", "header_only.fits",
                  "weird.fits", "good.fits"}  # fmt: skip
        wait_until(lambda: wanted <= set(frames_by_name(config)), 60, "the bad files and good")
        assert daemon.proc.poll() is None
    finally:
        stop_growing.set()
        growing.join()
    daemon.wait_idle(7, timeout=60)  # the grower, once it stops, is judged too
    assert daemon.stop() == 0
    rows = frames_by_name(config)
    assert rows["good.fits"]["status"] == "used"
    reasons = {
        "truncated.fits": "truncated",
        "empty.fits": "empty file",
        "notes.fits": "not a FITS file",
        "header_only.fits": "no image data",
        "growing.fits": "",
    }
    for name, word in reasons.items():
        assert rows[name]["status"] == "rejected", (name, rows[name])
        assert word in rows[name]["reason"], (name, rows[name]["reason"])
    assert "weird.fits" in rows and rows["weird.fits"]["status"] == "rejected"
    assert "deleted.fits" not in rows
    log = (tmp_path / "observd.log").read_text()
    assert "growing.fits still changing after" in log


# -- signals, systemd, status ------------------------------------------------------------


@pytest.mark.timeout(180)
def test_systemd_notify_ready_status_watchdog_and_stopping(tmp_path):
    camera = tmp_path / "camera"
    camera.mkdir()
    config = write_config(tmp_path, extra=FAST)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(1.0)
    messages: list[str] = []

    def receive_until(word: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
            if any(word in m for m in messages):
                return
        raise AssertionError(f"no {word} from the daemon; got {messages}")

    daemon = DaemonProcess(
        config, env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"}
    )
    try:
        receive_until("READY=1", 60)
        (camera / "bias.fits").write_bytes(bias_bytes(3))
        receive_until("1 used", 30)  # STATUS with tonight's counts
        receive_until("WATCHDOG=1", 10)
        assert daemon.stop() == 0
        receive_until("STOPPING=1", 10)
    finally:
        sock.close()
    status = [m for m in messages if "STATUS=" in m]
    assert any("night 2026-03-13" in m and "1 used" in m for m in status), status


def test_notifier_reads_the_environment():
    n = SystemdNotifier({"NOTIFY_SOCKET": "@observd-test", "WATCHDOG_USEC": "30000000"})
    assert n.enabled and n.watchdog_seconds == 30.0
    other = SystemdNotifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
    assert not other.enabled and other.watchdog_seconds is None  # pings are not ours
    SystemdNotifier({}).notify("READY=1")  # no socket: nothing happens, nothing raised


@pytest.mark.timeout(180)
def test_sighup_reloads_the_config_and_a_bad_config_is_refused(tmp_path):
    camera, second = tmp_path / "camera", tmp_path / "second"
    camera.mkdir()
    second.mkdir()
    config = write_config(tmp_path, extra=FAST)
    daemon = DaemonProcess(config)
    daemon.wait_running()
    (second / "b1.fits").write_bytes(bias_bytes(1))  # not watched yet
    (camera / "b0.fits").write_bytes(bias_bytes(0))
    daemon.wait_idle(1)
    good_text = config.read_text()
    config.write_text("[paths\nthis is not toml")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "config not reloaded" in (tmp_path / "observd.log").read_text(), 20,
               "the refusal in the log")  # fmt: skip
    assert daemon.proc.poll() is None
    config.write_text(good_text.replace('incoming = ["camera"]', 'incoming = ["camera", "second"]'))
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_idle(2, timeout=60)
    assert daemon.stop() == 0
    assert sorted(frames_by_name(config)) == ["b0.fits", "b1.fits"]


@pytest.mark.timeout(240)
def test_sigterm_checkpoints_every_stacked_frame_and_status_works_meanwhile(
    tmp_path, night_files
):
    camera = tmp_path / "camera"
    shutil.copytree(night_files, camera)
    config = write_config(tmp_path, extra=FAST)
    daemon = DaemonProcess(config)
    daemon.wait_running()
    n = sum(1 for p in camera.rglob("*") if p.is_file())
    wait_until(lambda: count_frames(config) >= n // 2, 120, "half the night")
    status = subprocess.run(
        [sys.executable, "-m", "observd", "status", "--json", "--config", str(config)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["daemon"]["alive"] is True
    daemon.wait_idle(n)
    assert daemon.stop() == 0
    with Catalog(tmp_path / "observd.sqlite", readonly=True) as cat:
        stacked = {r["id"] for r in cat.frames("status = 'stacked'")}
        held: set[int] = set()
        for row in cat.db["coadds"].rows:
            held |= set(json.loads(row["checkpoint_frames"] or "[]"))
    assert stacked and stacked <= held  # nothing to redo after a clean stop


# -- kill -9 at random moments: live equals batch ------------------------------------------


def _kill_run(tmp_path: Path, kills: int, seed: int) -> None:
    """A night written live while the daemon is killed ``kills`` times; then the night is
    ended, and compared with `observd ingest` over the same files in a fresh catalog."""
    sim = tmp_path / "sim"
    plan = NightPlan(
        n_bias=5, n_dark=3, dark_exptimes=(60.0,), n_flat=4, filters=("R", "V", "B"),
        targets=("M 51",), n_light=5, dawn_flats=True, meridian_flip=True,
    )  # fmt: skip
    live = tmp_path / "live"
    live.mkdir()
    (live / "camera").mkdir()
    config = write_config(live, incoming=str(sim / "camera"), extra=FAST)
    writer = threading.Thread(
        target=simulate_night,
        args=(sim, plan, CameraModel(size=256)),
        kwargs={"live": True, "speed": 2500.0},
    )
    (sim / "camera").mkdir(parents=True)
    rng = random.Random(seed)
    writer.start()
    daemon = DaemonProcess(config)
    for _ in range(kills):
        daemon.wait_running()
        time.sleep(rng.uniform(0.2, 2.5))
        daemon.kill()
        daemon = DaemonProcess(config)
    writer.join()
    before = sha256_tree(sim / "camera")
    daemon.wait_running()
    n = sum(1 for p in (sim / "camera").rglob("*") if p.is_file())
    daemon.wait_idle(n, timeout=300)
    daemon.proc.send_signal(signal.SIGUSR1)  # end the night now
    wait_until(lambda: (daemon.state() or {}).get("nights_finished", 0) >= 1, 120, "the finish")
    assert daemon.stop() == 0
    assert sha256_tree(sim / "camera") == before  # raw frames never modified

    batch = tmp_path / "batch"
    batch.mkdir()
    batch_config = write_config(batch, incoming=str(sim / "camera"), extra=FAST)
    subprocess.run(
        [sys.executable, "-m", "observd", "ingest", "-q", "--config", str(batch_config),
         str(sim / "camera")],
        check=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300,
    )  # fmt: skip
    _assert_same_night(live, batch)


def _assert_same_night(a: Path, b: Path) -> None:
    with Catalog(a / "observd.sqlite", readonly=True) as ca, Catalog(
        b / "observd.sqlite", readonly=True
    ) as cb:
        assert ca.integrity_ok() and cb.integrity_ok()
        fa = {r["path"]: (r["status"], r["reason"]) for r in ca.frames()}
        fb = {r["path"]: (r["status"], r["reason"]) for r in cb.frames()}
        assert len(fa) == ca.db["frames"].count  # no path twice
        assert fa == fb
        for cat in (ca, cb):
            for row in cat.db["coadds"].rows:
                ids = json.loads(row["checkpoint_frames"] or "[]")
                assert len(ids) == len(set(ids)) == row["n_frames"]  # no frame twice
    stacks_a = sorted((a / "products").glob("stacks/*/*/*.fits"))
    stacks_b = sorted((b / "products").glob("stacks/*/*/*.fits"))
    assert [p.name for p in stacks_a] == [p.name for p in stacks_b] and stacks_a
    for pa, pb in zip(stacks_a, stacks_b, strict=True):
        ha, hb = fits.getheader(pa), fits.getheader(pb)
        assert (ha["NCOMBINE"], ha["EXPTIME"]) == (hb["NCOMBINE"], hb["EXPTIME"]), pa.name
        da, db = fits.getdata(pa), fits.getdata(pb)
        ok = np.isfinite(da)
        assert np.array_equal(ok, np.isfinite(db)), pa.name
        scale = np.nanmax(np.abs(da))
        assert np.max(np.abs(da[ok] - db[ok])) <= 1e-5 * scale, pa.name


@pytest.mark.timeout(420)
def test_kill_9_at_random_moments_gives_the_stacks_of_a_batch_run(tmp_path):
    _kill_run(tmp_path, kills=4, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_kill_9_at_25_random_moments_gives_the_stacks_of_a_batch_run(tmp_path):
    _kill_run(tmp_path, kills=25, seed=2)


# -- the systemd unit --------------------------------------------------------------------


def test_systemd_unit_verifies_and_is_hardened(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    text = (REPO / "systemd" / "observd.service").read_text()
    for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=observd",
                "ProtectSystem=strict", "NoNewPrivileges=true", "PrivateTmp=true",
                "ProtectHome=true", "ReadOnlyPaths=", "ReadWritePaths=/var/lib/observd"):
        assert key in text, key  # fmt: skip
    # verify with ExecStart pointing at this machine's observd (the unit's path is an EDIT)
    exe = shutil.which("observd") or sys.executable
    unit = tmp_path / "observd.service"
    unit.write_text(text.replace("/opt/observd/bin/observd", exe))
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=true", str(unit)], capture_output=True, text=True
    )
    line = [x for x in security.stdout.splitlines() if "Overall exposure level" in x]
    assert line, security.stdout + security.stderr
    exposure = float(line[0].split(":")[-1].split()[0])
    assert exposure <= 2.5, line[0]


@pytest.mark.timeout(180)
def test_a_restart_after_the_night_still_ends_it_and_writes_the_summary(tmp_path):
    camera = tmp_path / "camera"
    camera.mkdir()
    config = write_config(tmp_path, extra=FAST)
    (camera / "b0.fits").write_bytes(bias_bytes(0))
    daemon = DaemonProcess(config)
    daemon.wait_running()
    daemon.wait_idle(1)
    daemon.kill()  # before the night was ended: no summary yet
    summary = tmp_path / "products" / "summary" / "2026-03-13" / "index.html"
    assert not summary.exists()
    # back after dawn, no new frame: the quiet time alone ends the night
    config.write_text(config.read_text().replace("finish_quiet_seconds = 3600.0",
                                                 "finish_quiet_seconds = 1.0"))  # fmt: skip
    daemon = DaemonProcess(config)
    daemon.wait_running()
    wait_until(lambda: (daemon.state() or {}).get("nights_finished", 0) >= 1, 60, "the finish")
    assert daemon.stop() == 0
    assert summary.exists()
