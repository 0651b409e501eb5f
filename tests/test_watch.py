"""The watcher on real folders with real watchdog observers (inotify and polling).

Settle times are short (0.3 s) so the whole file runs in well under a minute; every
watcher test has a timeout so a hang fails instead of blocking the suite.
"""

from __future__ import annotations

import errno
import gzip
import io
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from loguru import logger

from observd import watch as watch_module
from observd.config import Config, config_from_dict
from observd.watch import (
    FrameWatcher,
    Mount,
    SettledFile,
    check_fits_structure,
    is_network_filesystem,
    mount_for,
    parse_mountinfo,
)

SETTLE = 0.3
POLL = 0.2


# -- helpers ------------------------------------------------------------------------------


def fits_bytes(shape: tuple[int, ...] = (64, 64), seed: int = 0) -> bytes:
    """A small uint16 image as FITS bytes (header block + padded data)."""
    data = np.random.default_rng(seed).integers(0, 60000, shape).astype(np.uint16)
    buffer = io.BytesIO()
    fits.PrimaryHDU(data).writeto(buffer)
    return buffer.getvalue()


FRAME = fits_bytes()
HEADER_END = 2880  # one header block for this small image
DATA_END = HEADER_END + 64 * 64 * 2


def make_config(
    roots: list[Path], mode: str, *, settle: float = SETTLE, rescan: float = 300.0
) -> Config:
    return config_from_dict(
        {
            "paths": {"incoming": [str(r) for r in roots]},
            "watch": {
                "mode": mode,
                "settle_seconds": settle,
                "poll_seconds": POLL,
                "rescan_seconds": rescan,
            },
        }
    )


class Collector:
    """The consumer side: drains the output queue, noting when and how big each file was."""

    def __init__(self, output: queue.Queue[SettledFile]) -> None:
        self.items: list[tuple[float, SettledFile, int]] = []
        self._output = output
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._output.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                size_now = item.path.stat().st_size
            except FileNotFoundError:
                size_now = -1
            self.items.append((time.monotonic(), item, size_now))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def paths(self) -> list[Path]:
        return [item.path for _, item, _ in self.items]

    def wait_for(self, predicate: Callable[[list[Path]], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.paths):
                return True
            time.sleep(0.02)
        return predicate(self.paths)

    def wait_count(self, n: int, timeout: float = 10.0) -> bool:
        return self.wait_for(lambda paths: len(paths) >= n, timeout)


@contextmanager
def watching(config: Config, **kwargs) -> Iterator[tuple[FrameWatcher, Collector]]:
    watcher = FrameWatcher(config, **kwargs)
    collector = Collector(watcher.output)
    watcher.start()
    try:
        yield watcher, collector
    finally:
        watcher.stop()
        collector.stop()
    assert not watcher.running


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def logs() -> Iterator[list[dict]]:
    """Every loguru record emitted during the test."""
    records: list[dict] = []
    sink = logger.add(lambda message: records.append(message.record), level="DEBUG")
    yield records
    logger.remove(sink)


def errors(records: list[dict]) -> list[str]:
    return [r["message"] for r in records if r["level"].no >= 40]


@pytest.fixture(params=["inotify", "polling"])
def mode(request) -> str:
    return request.param


@pytest.fixture
def camera(tmp_path: Path) -> Path:
    folder = tmp_path / "camera"
    folder.mkdir()
    return folder


# -- the watcher on real folders ------------------------------------------------------------


@pytest.mark.timeout(30)
def test_file_written_in_chunks_is_handed_on_once_complete(camera, mode, logs):
    config = make_config([camera], mode)
    path = camera / "light_0001.fits"
    with watching(config) as (watcher, collector):
        chunks = [FRAME[i * len(FRAME) // 4 : (i + 1) * len(FRAME) // 4] for i in range(4)]
        with open(path, "wb") as f:
            for i, chunk in enumerate(chunks):
                f.write(chunk)
                f.flush()
                last_write = time.monotonic()
                if i < 3:
                    time.sleep(0.6)  # longer than settle: only the structure check holds it
        assert collector.wait_count(1)
        time.sleep(4 * SETTLE)
        assert watcher.status().candidates == 0
    assert collector.paths == [path]
    handed_at, item, size_then = collector.items[0]
    assert handed_at >= last_write
    assert item.size == len(FRAME) == size_then
    assert item.check == "complete"
    assert item.root == camera
    assert errors(logs) == []


@pytest.mark.timeout(30)
def test_existing_files_and_renamed_temp_file(camera, mode, logs):
    (camera / "night1").mkdir()
    old = [camera / "bias_001.fits", camera / "night1" / "dark_001.fit"]
    for p in old:
        p.write_bytes(FRAME)
    (camera / "notes.txt").write_text("not a frame")
    config = make_config([camera], mode)
    with watching(config) as (_, collector):
        assert collector.wait_count(2)
        temp = camera / "light_0002.fits.tmp"
        final = camera / "light_0002.fits"
        with open(temp, "wb") as f:  # written slowly under the temp name, then renamed
            f.write(FRAME[:4000])
            f.flush()
            time.sleep(3 * SETTLE)
            f.write(FRAME[4000:])
        os.rename(temp, final)
        assert collector.wait_count(3)
        time.sleep(4 * SETTLE)
    assert sorted(collector.paths) == sorted([*old, final])
    assert all(size == len(FRAME) for _, _, size in collector.items)
    assert errors(logs) == []


@pytest.mark.timeout(60)
def test_500_files_at_once_are_each_handed_on_once(camera, mode, logs):
    small = fits_bytes((8, 8))
    config = make_config([camera], mode)
    with watching(config) as (watcher, collector):
        expected = []
        for i in range(500):
            path = camera / f"flat_{i:04d}.fits"
            path.write_bytes(small)
            expected.append(path)
        assert collector.wait_count(500, timeout=40), len(collector.paths)
        time.sleep(4 * SETTLE)
        assert watcher.status().handed_on == 500
    assert len(collector.paths) == 500
    assert sorted(collector.paths) == sorted(expected)
    assert errors(logs) == []


@pytest.mark.timeout(40)
def test_root_removed_and_recreated(camera, mode, logs):
    config = make_config([camera], mode)
    with watching(config) as (watcher, collector):
        (camera / "a.fits").write_bytes(FRAME)
        assert collector.wait_count(1)
        shutil.rmtree(camera)
        assert wait_until(lambda: watcher.status().roots_missing == [camera], timeout=5)
        time.sleep(1.2)  # a few health checks while it is gone: logged once
        camera.mkdir()
        (camera / "b.fits").write_bytes(FRAME)
        assert collector.wait_for(lambda paths: camera / "b.fits" in paths)
        (camera / "c.fits").write_bytes(FRAME)  # events flow again after the return
        assert collector.wait_for(lambda paths: camera / "c.fits" in paths)
        status = watcher.status()
        assert watcher.running
        assert status.roots_missing == []
        assert status.roots[0].observer_alive
        assert status.roots[0].mode == mode
    assert collector.paths.count(camera / "b.fits") == 1
    missing = [r for r in logs if "is missing" in r["message"]]
    assert len(missing) == 1
    assert errors(logs) == []


@pytest.mark.timeout(30)
def test_truncated_file_is_handed_on_after_the_incomplete_timeout(camera, mode, logs):
    config = make_config([camera], mode)
    path = camera / "light_cut.fits"
    with watching(config, incomplete_seconds=1.5) as (_, collector):
        path.write_bytes(FRAME[: HEADER_END + 3000])  # the writer died half-way
        written = time.monotonic()
        assert collector.wait_count(1)
        handed_at, item, _ = collector.items[0]
    assert handed_at - written >= 1.5
    assert item.check == "incomplete"
    assert item.size == HEADER_END + 3000
    assert any("incomplete" in r["message"] for r in logs if r["level"].name == "WARNING")
    assert errors(logs) == []


@pytest.mark.timeout(30)
def test_text_file_handed_on_and_deleted_file_dropped(camera, mode, logs):
    config = make_config([camera], mode)
    text = camera / "readme.fits"
    gone = camera / "gone.fits"
    with watching(config) as (watcher, collector):
        text.write_text("this is not a FITS file\n")
        gone.write_bytes(FRAME[:HEADER_END])  # incomplete: held while settling...
        time.sleep(3 * SETTLE)
        gone.unlink()  # ...and deleted meanwhile
        assert collector.wait_count(1)
        time.sleep(4 * SETTLE)
        assert watcher.status().candidates == 0
    assert collector.paths == [text]
    assert collector.items[0][1].check == "not_fits"
    assert errors(logs) == []


@pytest.mark.timeout(30)
def test_known_hook_and_rescans_hand_each_version_on_once(camera, logs):
    for name in ("old_1.fits", "old_2.fits", "new.fits"):
        (camera / name).write_bytes(FRAME)
    calls: list[tuple[Path, os.stat_result]] = []

    def known(path: Path, st: os.stat_result) -> bool:
        calls.append((path, st))
        return path.name.startswith("old_")

    config = make_config([camera], "inotify", rescan=0.4)
    new = camera / "new.fits"
    with watching(config, known=known) as (_, collector):
        assert collector.wait_count(1)
        time.sleep(1.5)  # several periodic rescans
        assert collector.paths == [new]
        new.write_bytes(fits_bytes(seed=1) + bytes(2880))  # a new version of the same file
        assert collector.wait_count(2)
        time.sleep(1.0)
    assert collector.paths == [new, new]
    assert [item.size for _, item, _ in collector.items] == [len(FRAME), len(FRAME) + 2880]
    assert all(isinstance(p, Path) and isinstance(s, os.stat_result) for p, s in calls)
    assert {p.name for p, _ in calls} >= {"old_1.fits", "old_2.fits", "new.fits"}
    assert errors(logs) == []


@pytest.mark.timeout(30)
def test_file_that_keeps_growing_is_warned_about_once(camera, logs):
    config = make_config([camera], "inotify")
    path = camera / "slow.fits"
    with watching(config, incomplete_seconds=1.0) as (_, collector):
        with open(path, "wb") as f:
            f.write(FRAME[:HEADER_END])
            for offset in range(HEADER_END, HEADER_END + 2000, 100):  # 2 s of trickling
                f.write(FRAME[offset : offset + 100])
                f.flush()
                time.sleep(0.1)
            f.write(FRAME[HEADER_END + 2000 :])
        assert collector.wait_count(1)
        time.sleep(3 * SETTLE)
    assert collector.paths == [path]
    assert collector.items[0][1].size == len(FRAME)
    growing = [r for r in logs if "still changing" in r["message"]]
    assert len(growing) == 1 and growing[0]["level"].name == "WARNING"
    assert errors(logs) == []


@pytest.mark.timeout(30)
def test_event_queue_overflow_triggers_a_rescan(camera, logs):
    config = make_config([camera], "inotify")
    with watching(config) as (watcher, _):
        assert wait_until(lambda: watcher.status().last_rescan is not None)
        first = watcher.status().last_rescan
        # What watchdog logs when the kernel dropped events (IN_Q_OVERFLOW).
        logging.getLogger("watchdog.observers.inotify_c").warning(
            "Inotify queue overflowed; filesystem events were lost"
        )
        assert wait_until(lambda: watcher.status().last_rescan != first, timeout=3)
    assert any("overflow scan" in r["message"] for r in logs)


@pytest.mark.timeout(30)
def test_dead_observer_is_restarted(camera, logs):
    config = make_config([camera], "inotify")
    with watching(config) as (watcher, collector):
        watcher._roots[0].observer.stop()  # what a crashed observer thread looks like
        assert wait_until(lambda: watcher.status().roots[0].restarts == 1, timeout=5)
        assert wait_until(lambda: watcher.status().roots[0].observer_alive, timeout=5)
        (camera / "after.fits").write_bytes(FRAME)
        assert collector.wait_count(1)
    assert collector.paths == [camera / "after.fits"]
    assert any("stopped; restarting" in message for message in errors(logs))


@pytest.mark.timeout(30)
def test_inotify_limit_falls_back_to_polling(camera, logs, monkeypatch):
    # Fault injection: the real limit is system-wide and must not be lowered in a test.
    real = watch_module._new_observer

    def limited(mode: str, poll_seconds: float):
        if mode == "inotify":
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return real(mode, poll_seconds)

    monkeypatch.setattr(watch_module, "_new_observer", limited)
    config = make_config([camera], "inotify")
    with watching(config) as (watcher, collector):
        root = watcher.status().roots[0]
        assert (root.mode, root.reason) == ("polling", "inotify limit reached")
        (camera / "x.fits").write_bytes(FRAME)
        assert collector.wait_count(1)
    assert any("inotify limit" in r["message"] for r in logs if r["level"].name == "WARNING")
    assert errors(logs) == []


@pytest.mark.timeout(30)
def test_missing_root_at_start_is_watched_for(tmp_path, logs):
    later = tmp_path / "share"
    config = make_config([later], "auto")
    with watching(config) as (watcher, collector):
        assert watcher.status().roots_missing == [later]
        later.mkdir()
        (later / "first.fits").write_bytes(FRAME)
        assert collector.wait_count(1)
        assert watcher.status().roots[0].mode == "inotify"  # a local disk in "auto"
    assert collector.paths == [later / "first.fits"]
    assert errors(logs) == []


# -- FITS structure -------------------------------------------------------------------------


def test_structure_of_a_simple_image(tmp_path):
    path = tmp_path / "f.fits"
    cases = [
        (b"", "incomplete"),
        (b"SIMP", "incomplete"),
        (FRAME[:1000], "incomplete"),  # header block not all there
        (FRAME[:HEADER_END], "incomplete"),  # header only
        (FRAME[: DATA_END - 1], "incomplete"),
        (FRAME[:DATA_END], "complete"),  # final padding is not required
        (FRAME, "complete"),
        (b"hello, world\n" * 300, "not_fits"),
        (bytes(5760), "not_fits"),
    ]
    for content, state in cases:
        path.write_bytes(content)
        result = check_fits_structure(path)
        assert result.state == state, (len(content), result)
        assert result.size == len(content)
    path.write_bytes(FRAME[:HEADER_END])
    assert check_fits_structure(path).expected_size == DATA_END


def test_structure_of_extensions_and_compressed_files(tmp_path):
    image = np.random.default_rng(2).integers(0, 60000, (64, 64)).astype(np.uint16)
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image)]).writeto(buffer)
    mef = buffer.getvalue()
    buffer = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(image)]).writeto(buffer)
    fz = buffer.getvalue()
    cases = [
        ("mef.fits", mef, "complete"),
        ("mef.fits", mef[: len(mef) - 2881], "incomplete"),  # cut inside the extension
        ("mef.fits", mef[:2880], "complete"),  # nothing says an extension should follow
        ("img.fits.fz", fz, "complete"),
        ("img.fits.fz", fz[:2880], "incomplete"),  # primary only: the table is missing
        ("img.fits.fz", fz[: len(fz) - 2881], "incomplete"),  # table or heap cut short
        ("img.fits.gz", gzip.compress(FRAME), "compressed"),
    ]
    for name, content, state in cases:
        path = tmp_path / name
        path.write_bytes(content)
        assert check_fits_structure(path).state == state, (name, len(content))


# -- network filesystem detection -----------------------------------------------------------

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
40 27 0:44 / /srv/camera rw,relatime shared:20 - nfs4 cam-pc:/export/ccd rw,vers=4.2
41 27 0:45 / /mnt/smb\\040share rw,relatime - cifs //cam-pc/frames rw,vers=3.1.1
42 27 0:46 / /home/obs/remote rw,nosuid,nodev - fuse.sshfs obs@cam-pc:/data rw
43 27 0:47 / /var/lib/docker/overlay2/abc/merged rw - overlay overlay rw,lowerdir=/x
44 40 0:48 / /srv/camera/local rw - ext4 /dev/sdb1 rw
"""


def test_mountinfo_parser():
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m.fs_type for m in mounts] == [
        "proc", "ext4", "nfs4", "cifs", "fuse.sshfs", "overlay", "ext4",
    ]  # fmt: skip
    assert mounts[2] == Mount("/srv/camera", "nfs4", "cam-pc:/export/ccd")
    assert mounts[3].mount_point == "/mnt/smb share"  # octal escape undone


@pytest.mark.parametrize(
    ("path", "fs_type", "network"),
    [
        ("/srv/camera", "nfs4", True),
        ("/srv/camera/2024-04-28/light.fits", "nfs4", True),
        ("/srv/camera/local/x", "ext4", False),  # a local disk mounted inside the share
        ("/srv/cameras", "ext4", False),  # a prefix of the string, not of the path
        ("/mnt/smb share/night", "cifs", True),
        ("/home/obs/remote/frames", "fuse.sshfs", True),
        ("/var/lib/docker/overlay2/abc/merged/data", "overlay", False),
        ("/home/obs", "ext4", False),
    ],
)
def test_mount_for_longest_prefix(path, fs_type, network):
    mount = mount_for(path, parse_mountinfo(MOUNTINFO))
    assert mount is not None and mount.fs_type == fs_type
    assert is_network_filesystem(mount.fs_type) is network


def test_proc_mounts_format_and_filesystem_names():
    text = "cam-pc:/ccd /data nfs rw,vers=3 0 0\n/dev/vda / ext4 rw 0 0\n"
    assert mount_for("/data/x", parse_mountinfo(text)) == Mount("/data", "nfs", "cam-pc:/ccd")
    for kind in ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "ceph",
                 "glusterfs", "fuse.glusterfs", "davfs", "fuse.davfs2"):  # fmt: skip
        assert is_network_filesystem(kind), kind
    for kind in ("ext4", "xfs", "btrfs", "overlay", "tmpfs", "fuseblk", "fuse.ntfs-3g"):
        assert not is_network_filesystem(kind), kind
    assert mount_for("/x", []) is None
