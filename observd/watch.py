"""Find settled frame files in the camera folders and hand each one on, once.

The watcher does no pipeline work. watchdog event handlers only note candidate paths
in a dict (so an event flood collapses to one entry per file); one checker thread
decides when a candidate has *settled* and puts it on a bounded queue for the single
pipeline worker. Events are only hints: a startup scan and a periodic reconciling
rescan catch what watchdog misses (network shares, dropped events, files written while
observd was down), and the checker thread also supervises the observers, because
watchdog's observers stop quietly when a watched folder goes away.

Settled means: (size, mtime_ns) unchanged for ``watch.settle_seconds`` *and* the FITS
structure complete (an END card, and as many bytes as the headers promise). Reading the
headers costs a few KB per file, never the data. A file must never be held forever, so
files that are not FITS, are compressed, or stay incomplete but unchanged for long enough
are handed on too; the pipeline records why it cannot use them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import queue
import re
import stat as stat_module
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from loguru import logger
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from observd.config import Config
from observd.ingest import find_frame_files, is_frame_name

__all__ = [
    "FrameWatcher",
    "SettledFile",
    "WatcherStatus",
    "RootStatus",
    "FitsCheck",
    "check_fits_structure",
    "Mount",
    "parse_mountinfo",
    "mount_for",
    "is_network_filesystem",
    "NETWORK_FILESYSTEMS",
]

KnownHook = Callable[[Path, os.stat_result], bool]
"""``known(path, stat) -> True`` when the caller has already processed this version."""

CheckState = Literal["complete", "incomplete", "not_fits", "compressed", "unreadable"]

# ---------------------------------------------------------------------------------------
# Network filesystems: inotify only sees changes made by this kernel, so a share written
# by the camera PC must be polled (watchdog #409, #504).
# ---------------------------------------------------------------------------------------

NETWORK_FILESYSTEMS: frozenset[str] = frozenset(
    {
        "nfs", "nfs3", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "9p", "ceph",
        "glusterfs", "davfs", "afs", "ncpfs", "lustre", "gpfs", "beegfs", "ocfs2", "gfs2",
        "virtiofs", "vboxsf", "vmhgfs", "orangefs",
    }
)  # fmt: skip
"""Kernel filesystem types whose files another machine may write."""

_NETWORK_FUSE: frozenset[str] = frozenset(
    {
        "sshfs", "ceph", "glusterfs", "davfs", "davfs2", "rclone", "s3fs", "gcsfuse",
        "vmhgfs-fuse", "smbnetfs", "curlftpfs", "moosefs", "mfs", "juicefs", "goofys",
    }
)  # fmt: skip
"""FUSE subtypes (``fuse.<subtype>`` in mountinfo) that are network filesystems."""


@dataclass(frozen=True)
class Mount:
    """One line of the mount table: where, what kind, from where."""

    mount_point: str
    fs_type: str
    source: str = ""


def is_network_filesystem(fs_type: str) -> bool:
    """True when files on this filesystem type may be written by another machine.

    Parameters
    ----------
    fs_type
        The type as the mount table spells it: ``nfs4``, ``cifs``, ``fuse.sshfs``...

    Returns
    -------
    bool
    """
    kind = fs_type.strip().lower()
    if kind in NETWORK_FILESYSTEMS or kind.startswith("nfs"):
        return True
    if kind.startswith("fuse."):
        return kind.split(".", 1)[1] in _NETWORK_FUSE
    return False


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(text: str) -> str:
    """The kernel writes space, tab, newline and backslash in paths as octal escapes."""
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse ``/proc/self/mountinfo`` (or ``/proc/mounts``) text into mounts.

    Parameters
    ----------
    text
        The file's content. mountinfo lines (``36 35 98:0 / /mnt opts - nfs4 src opts``)
        and /proc/mounts lines (``src /mnt nfs4 opts 0 0``) are both understood; lines
        that are neither are skipped.

    Returns
    -------
    list of Mount
        In file order (a later mount on the same point hides an earlier one).
    """
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        if fields[0].isdigit() and "-" in fields[6:]:
            sep = fields.index("-", 6)
            if len(fields) <= sep + 1:
                continue
            source = fields[sep + 2] if len(fields) > sep + 2 else ""
            mounts.append(Mount(_unescape(fields[4]), fields[sep + 1], _unescape(source)))
        elif fields[1].startswith("/"):
            mounts.append(Mount(_unescape(fields[1]), fields[2], _unescape(fields[0])))
    return mounts


def mount_for(path: str | os.PathLike[str], mounts: Sequence[Mount]) -> Mount | None:
    """The mount that holds ``path``: the longest mount point that is a prefix of it.

    Parameters
    ----------
    path
        An absolute path; resolve symlinks first (``os.path.realpath``).
    mounts
        From :func:`parse_mountinfo`.

    Returns
    -------
    Mount or None
        None when no mount point matches (an empty table, or a relative path).
    """
    target = os.fspath(path)
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point.rstrip("/") or "/"
        inside = target == point or target.startswith(point if point == "/" else point + "/")
        # ">=": a later mount on the same point hides the earlier one.
        if inside and (best is None or len(point) >= len(best.mount_point.rstrip("/") or "/")):
            best = mount
    return best


def _read_mounts() -> list[Mount]:
    for source in ("/proc/self/mountinfo", "/proc/mounts"):
        try:
            with open(source, encoding="utf-8", errors="surrogateescape") as f:
                return parse_mountinfo(f.read())
        except OSError:
            continue
    return []


# ---------------------------------------------------------------------------------------
# FITS structure: is every byte the headers promise on disk yet?
# ---------------------------------------------------------------------------------------

_BLOCK = 2880
_CARD = 80
_MAX_HEADER_BLOCKS = 1000  # 36 000 cards: beyond this the file is not a sane FITS file
_MAX_HDUS = 1000
_BITPIX = {8, 16, 32, 64, -32, -64}


@dataclass(frozen=True)
class FitsCheck:
    """Whether a file's FITS structure is complete, as seen at (size, mtime_ns)."""

    state: CheckState
    """``complete``; ``incomplete`` (fewer bytes than promised); ``not_fits`` (handed on
    for the pipeline to reject); ``compressed`` (gzip/bzip2: size and time only);
    ``unreadable`` (could not be opened or read)."""
    detail: str
    size: int
    mtime_ns: int
    expected_size: int | None = None
    """The bytes the headers promise, when known."""


class _Incomplete(Exception):
    def __init__(self, detail: str, expected: int | None = None) -> None:
        super().__init__(detail)
        self.expected = expected


class _NotFits(Exception):
    pass


def check_fits_structure(path: str | os.PathLike[str]) -> FitsCheck:
    """Check that a FITS file holds every byte its headers promise, reading headers only.

    Walks the HDUs: each header must end with an END card, and the file must hold
    ``|BITPIX|/8 * GCOUNT * (PCOUNT + NAXIS1 * ... * NAXISn)`` data bytes after it (the
    final padding to 2880 bytes is not required). A tile-compressed ``.fz`` file must also
    hold its compressed-image extension, not only the empty primary HDU.

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    FitsCheck
        With the size and mtime of the file as it was read.

    Raises
    ------
    OSError
        When the file cannot be opened or read (FileNotFoundError when it vanished).
    """
    path = Path(path)
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        size = st.st_size

        def result(state: CheckState, detail: str, expected: int | None = None) -> FitsCheck:
            return FitsCheck(state, detail, size, st.st_mtime_ns, expected)

        head = f.read(_BLOCK)
        name = path.name.lower()
        if head.startswith((b"\x1f\x8b", b"BZh")) or name.endswith((".gz", ".bz2")):
            return result("compressed", "gzip/bzip2 file: settled by size and time only")
        if len(head) < 9:
            if b"SIMPLE  =".startswith(head):
                return result("incomplete", f"only {size} bytes so far")
            return result("not_fits", "does not start with a SIMPLE card")
        if not head.startswith(b"SIMPLE  ="):
            return result("not_fits", "does not start with a SIMPLE card")
        try:
            hdus, detail = _walk_hdus(f, size)
        except _Incomplete as exc:
            return result("incomplete", str(exc), exc.expected)
        except _NotFits as exc:
            return result("not_fits", str(exc))
        if name.endswith(".fz") and hdus == 1:
            return result("incomplete", "tile-compressed file without its image extension yet")
        return result("complete", detail)


def _walk_hdus(f: Any, size: int) -> tuple[int, str]:
    """Count complete HDUs; raise _Incomplete / _NotFits. Returns (hdus, detail)."""
    offset = 0
    for index in range(_MAX_HDUS):
        cards, header_end, end_card_end = _read_header(f, offset, size, index)
        nbytes = _data_bytes(cards, index)
        required = end_card_end if nbytes == 0 else header_end + nbytes
        if size < required:
            raise _Incomplete(f"HDU {index} needs {required} bytes, file has {size}", required)
        next_offset = header_end + math.ceil(nbytes / _BLOCK) * _BLOCK
        if size <= next_offset:
            return index + 1, f"{index + 1} HDU(s), {size} bytes"
        f.seek(next_offset)
        peek = f.read(8)
        if peek == b"XTENSION":
            offset = next_offset
            continue
        if len(peek) < 8 and b"XTENSION".startswith(peek):
            raise _Incomplete(f"HDU {index + 1} header is being written", next_offset + _BLOCK)
        return index + 1, f"{index + 1} HDU(s), {size - next_offset} trailing bytes ignored"
    return _MAX_HDUS, f"stopped checking after {_MAX_HDUS} HDUs"


def _read_header(f: Any, offset: int, size: int, index: int) -> tuple[dict[str, str], int, int]:
    """Cards of the header at ``offset``: (cards, end of header blocks, end of END card)."""
    f.seek(offset)
    cards: dict[str, str] = {}
    for n in range(_MAX_HEADER_BLOCKS):
        block = f.read(_BLOCK)
        for k in range(len(block) // _CARD):
            card = block[k * _CARD : (k + 1) * _CARD]
            key = card[:8].rstrip().decode("ascii", "replace")
            if key == "END":
                start = offset + n * _BLOCK
                return cards, start + _BLOCK, start + (k + 1) * _CARD
            if card[8:10] == b"= " and key not in cards:
                cards[key] = card[10:].decode("ascii", "replace")
        if len(block) < _BLOCK:
            end = offset + (n + 1) * _BLOCK
            raise _Incomplete(f"HDU {index} header has no END card yet ({size} bytes)", end)
    raise _NotFits(f"HDU {index} header has no END card in {_MAX_HEADER_BLOCKS} blocks")


def _data_bytes(cards: dict[str, str], index: int) -> int:
    """Data bytes of one HDU (without padding), from its header cards."""

    def number(key: str, default: int | None = None) -> int:
        raw = cards.get(key)
        if raw is None:
            if default is None:
                raise _NotFits(f"HDU {index} has no {key} card")
            return default
        token = raw.split("/", 1)[0].strip()
        try:
            return int(token)
        except ValueError:
            raise _NotFits(f"HDU {index}: {key} = {token!r} is not an integer") from None

    bitpix = number("BITPIX")
    naxis = number("NAXIS")
    if bitpix not in _BITPIX or not 0 <= naxis <= 999:
        raise _NotFits(f"HDU {index}: BITPIX = {bitpix}, NAXIS = {naxis} are not valid")
    if naxis == 0:
        return 0
    dims = [number(f"NAXIS{j}") for j in range(1, naxis + 1)]
    if any(d < 0 for d in dims):
        raise _NotFits(f"HDU {index}: negative NAXISn")
    groups = cards.get("GROUPS", "").split("/", 1)[0].strip() == "T"
    if index == 0 and groups and dims[0] == 0:
        dims = dims[1:]  # random groups: NAXIS1 = 0 is a placeholder
    pcount = number("PCOUNT", 0)
    gcount = number("GCOUNT", 1)
    return abs(bitpix) // 8 * gcount * (pcount + math.prod(dims))


# ---------------------------------------------------------------------------------------
# What the watcher hands on and what it reports.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SettledFile:
    """A frame file that has settled: the pipeline may read it now.

    ``size`` and ``mtime_ns`` are the version that settled; ``check`` says whether its
    FITS structure was complete (anything but ``complete`` or ``compressed`` means the
    pipeline will most likely reject it, with ``detail`` as a hint).
    """

    path: Path
    root: Path
    size: int
    mtime_ns: int
    check: CheckState
    detail: str


@dataclass(frozen=True)
class RootStatus:
    """One watched folder, for the dome page."""

    path: Path
    present: bool
    mode: str | None
    """``inotify`` or ``polling`` while an observer runs; None otherwise."""
    reason: str
    """Why that mode (config, network filesystem, inotify limit) or why not watched."""
    fs_type: str | None
    observer_alive: bool
    missing_since: float | None
    """Epoch seconds since when the folder has been missing; None when present."""
    restarts: int


@dataclass(frozen=True)
class WatcherStatus:
    """A snapshot of the watcher, for the dome page and ``observd status``."""

    running: bool
    roots: tuple[RootStatus, ...]
    candidates: int
    """Files seen but not settled yet."""
    waiting_for_queue: int
    """Settled files waiting because the pipeline queue is full."""
    handed_on: int
    last_event: float | None
    """Epoch seconds of the last filesystem event; None before the first one."""
    last_rescan: float | None
    last_tick: float | None
    """Epoch seconds of the checker thread's last round; old means the thread is stuck."""

    @property
    def roots_missing(self) -> list[Path]:
        return [r.path for r in self.roots if not r.present]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (paths as strings)."""
        data = asdict(self)
        for root in data["roots"]:
            root["path"] = str(root["path"])
        data["roots_missing"] = [str(p) for p in self.roots_missing]
        return data


# ---------------------------------------------------------------------------------------
# The watcher.
# ---------------------------------------------------------------------------------------

_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]
"""No open/close-nowrite events: our own header reads and the pipeline's must not look
like writes (they would restart the settle timer forever)."""

_INOTIFY_LIMIT_ERRNOS = {errno.ENOSPC, errno.EMFILE}


def _new_observer(mode: str, poll_seconds: float) -> BaseObserver:
    """An unstarted observer: polling, or the platform's native one (inotify on Linux)."""
    if mode == "polling":
        return PollingObserver(timeout=poll_seconds)
    return Observer()


def _observer_alive(observer: BaseObserver) -> bool:
    """The dispatcher thread and every emitter thread run (watchdog stops an emitter,
    not the observer, when its folder goes away)."""
    emitters = list(observer.emitters)
    return observer.is_alive() and bool(emitters) and all(e.is_alive() for e in emitters)


@dataclass
class _Candidate:
    """A path that may be a new frame version; owned by the checker, noted by handlers."""

    path: Path
    root: Path
    first_seen: float
    next_check: float
    version: tuple[int, int] | None = None
    baseline_at: float | None = None
    """Monotonic time since which ``version`` has been seen with no event in between."""
    gen: int = 0
    """Bumped by every event, so the checker can tell its stat is already stale."""
    stat: os.stat_result | None = None
    check: FitsCheck | None = None
    warned_growing: bool = False
    warned_error: bool = False


@dataclass
class _Root:
    """Supervision state of one watched folder (checker thread only)."""

    path: Path
    handler: _Handler
    present: bool = False
    reported_missing: bool = False
    missing_since: float | None = None
    observer: BaseObserver | None = None
    mode: str | None = None
    reason: str = "not started"
    fs_type: str | None = None
    identity: tuple[int, int] | None = None
    inotify_failed: bool = False
    started_at: float = 0.0
    next_start: float = 0.0
    backoff: float = 0.0
    """Seconds before the next (re)start attempt; 0 = at once. Grows while it keeps failing."""
    restarts: int = 0


class _OverflowListener(logging.Handler):
    """watchdog reports a kernel event-queue overflow (events lost, watchdog #654) only
    through stdlib logging; hearing it, ask for a rescan at once instead of waiting up to
    ``rescan_seconds``."""

    def __init__(self, watcher: FrameWatcher) -> None:
        super().__init__(logging.WARNING)
        self._watcher = watcher

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            if "overflow" in record.getMessage().lower():
                self._watcher._on_overflow()


_WATCHDOG_OVERFLOW_LOGGER = "watchdog.observers.inotify_c"


class _Handler(FileSystemEventHandler):
    """Notes candidates for one root; never reads a file and never raises into watchdog."""

    def __init__(self, watcher: FrameWatcher, root: Path) -> None:
        super().__init__()
        self._watcher = watcher
        self._root = root

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._watcher._on_event(self._root, event)
        except Exception:  # a handler exception would kill the observer thread
            logger.exception("watch: cannot note event {}", event)


class FrameWatcher:
    """Watch the camera folders; hand every settled frame version on, exactly once.

    Parameters
    ----------
    config
        Uses ``paths.incoming`` (the roots, watched recursively), ``watch`` (mode,
        settle, poll and rescan seconds) and ``ingest`` (which names are frames).
    output
        The queue settled files go to, as :class:`SettledFile`. When None a bounded
        ``queue.Queue(maxsize=queue_size)`` is made; read it from :attr:`output`. When the
        queue is full the watcher keeps the settled files and retries: it never drops one.
    known
        ``known(path, stat) -> bool``; True when the caller has already processed this
        version of the file (e.g. a catalog lookup on path, size and mtime_ns). Called
        from the watcher's thread, so it must not use a connection made in another
        thread. An exception counts as "not known".
    incomplete_seconds
        How long a file that is unchanged but structurally incomplete is held before it
        is handed on anyway; also how long a file may keep changing before a warning.
        Default ``max(10 * settle_seconds, 60)``.
    queue_size
        Size of the queue made when ``output`` is None.
    tick_seconds
        How often the checker thread wakes; default ``min(0.25, settle_seconds / 4)``,
        at least 0.05.
    health_seconds
        How often roots and observers are checked.

    Examples
    --------
    >>> with FrameWatcher(config, known=catalog_knows) as watcher:  # doctest: +SKIP
    ...     while True:
    ...         settled = watcher.output.get()
    ...         pipeline.process(settled.path)
    """

    def __init__(
        self,
        config: Config,
        output: queue.Queue[SettledFile] | None = None,
        *,
        known: KnownHook | None = None,
        incomplete_seconds: float | None = None,
        queue_size: int = 256,
        tick_seconds: float | None = None,
        health_seconds: float = 1.0,
    ) -> None:
        self.config = config
        self.output: queue.Queue[SettledFile] = (
            output if output is not None else queue.Queue(maxsize=queue_size)
        )
        self._known = known
        watch = config.watch
        self._settle = float(watch.settle_seconds)
        self._poll = float(watch.poll_seconds)
        self._rescan_every = float(watch.rescan_seconds)
        self._incomplete = (
            float(incomplete_seconds)
            if incomplete_seconds is not None
            else max(10.0 * self._settle, 60.0)
        )
        self._tick = tick_seconds if tick_seconds else max(0.05, min(0.25, self._settle / 4))
        self._health_every = health_seconds

        roots: list[Path] = []
        for root in config.paths.incoming:
            path = Path(root).expanduser().absolute()
            if path not in roots:
                roots.append(path)
        self._roots = [_Root(path, _Handler(self, path)) for path in roots]

        self._lock = threading.Lock()  # guards _candidates, _dirs, _rescans, _last_event
        self._candidates: dict[Path, _Candidate] = {}
        self._dirs: set[tuple[Path, Path]] = set()
        self._rescans: dict[Path, str] = {}
        self._last_event: float | None = None

        # Checker thread only:
        self._handed: dict[Path, tuple[int, int]] = {}
        self._ready: deque[SettledFile] = deque()
        self._handed_count = 0
        self._queue_full_since: float | None = None
        self._last_rescan: float | None = None
        self._last_tick: float | None = None
        self._errors: dict[str, float] = {}

        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._reapers: list[threading.Thread] = []
        self._started = False
        self._overflow_listener = _OverflowListener(self)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the observers and the checker thread; returns once events are watched.

        Roots that are missing are logged and watched for. Observers are up before the
        startup scan runs (in the thread), so no file falls between scan and events.
        """
        if self._started:
            raise RuntimeError("FrameWatcher.start() called twice")
        self._started = True
        logging.getLogger(_WATCHDOG_OVERFLOW_LOGGER).addHandler(self._overflow_listener)
        if not self._roots:
            logger.warning("watch: no folders to watch (paths.incoming is empty)")
        for root in self._roots:
            self._guard(f"root {root.path}", self._check_root, root, time.monotonic())
        self._thread = threading.Thread(target=self._run, name="observd-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the checker thread and the observers and wait for them.

        Settled files still waiting for queue space are not handed on; the next startup
        scan finds them again (the ``known`` hook skips what was processed).
        """
        self._stopping.set()
        self._wake.set()
        logging.getLogger(_WATCHDOG_OVERFLOW_LOGGER).removeHandler(self._overflow_listener)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("watch: checker thread did not stop within {:.0f} s", timeout)
        for root in self._roots:
            self._stop_observer(root)
        deadline = time.monotonic() + timeout
        for reaper in self._reapers:
            reaper.join(max(0.0, deadline - time.monotonic()))
        self._reapers = [r for r in self._reapers if r.is_alive()]

    def __enter__(self) -> FrameWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def handing_on(self) -> bool:
        """True while settled files are being moved to the output queue (a burst the
        consumer should take as a whole)."""
        return bool(self._ready)

    @property
    def running(self) -> bool:
        """True while the checker thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> WatcherStatus:
        """What the dome page shows: per-root mode and presence, pending work, last event."""
        roots = []
        for r in self._roots:
            observer = r.observer  # the checker thread may swap it meanwhile
            roots.append(
                RootStatus(
                    path=r.path,
                    present=r.present,
                    mode=r.mode if observer is not None else None,
                    reason=r.reason,
                    fs_type=r.fs_type,
                    observer_alive=observer is not None and _observer_alive(observer),
                    missing_since=r.missing_since,
                    restarts=r.restarts,
                )
            )
        with self._lock:
            candidates = len(self._candidates)
            last_event = self._last_event
        return WatcherStatus(
            running=self.running,
            roots=tuple(roots),
            candidates=candidates,
            waiting_for_queue=len(self._ready),
            handed_on=self._handed_count,
            last_event=last_event,
            last_rescan=self._last_rescan,
            last_tick=self._last_tick,
        )

    # -- event side (observer threads): note, never work --------------------------------

    def _on_event(self, root: Path, event: FileSystemEvent) -> None:
        src = Path(os.fsdecode(event.src_path)) if event.src_path else None
        dest = Path(os.fsdecode(event.dest_path)) if event.dest_path else None
        with self._lock:
            self._last_event = time.time()
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                folder = dest or src
                if folder is not None and not _hidden_below(root, folder):
                    with self._lock:
                        self._dirs.add((root, folder))
            elif event.event_type == "deleted" and src == root:
                self._wake.set()  # let the health check notice at once
            return
        if event.event_type == "moved":
            if src is not None:
                self._forget(src)
            if dest is not None:
                self._note(root, dest)
        elif event.event_type == "deleted":
            if src is not None:
                self._forget(src)
        elif src is not None:
            self._note(root, src)

    def _wanted(self, root: Path, path: Path) -> bool:
        return is_frame_name(path, self.config) and not _hidden_below(root, path.parent)

    def _note(self, root: Path, path: Path) -> None:
        """A file changed: (re)start its settle clock; the checker stats it next tick."""
        if not self._wanted(root, path):
            return
        now = time.monotonic()
        with self._lock:
            candidate = self._candidates.get(path)
            if candidate is None:
                self._candidates[path] = _Candidate(path, root, first_seen=now, next_check=now)
            else:
                candidate.gen += 1
                candidate.baseline_at = None
                candidate.next_check = now

    def _on_overflow(self) -> None:
        logger.warning("watch: the kernel event queue overflowed (events lost); rescanning")
        with self._lock:
            for root in self._roots:
                self._rescans.setdefault(root.path, "overflow")
        self._wake.set()

    def _forget(self, path: Path) -> None:
        with self._lock:
            self._candidates.pop(path, None)

    # -- checker thread -----------------------------------------------------------------

    def _run(self) -> None:
        """Settle, supervise, rescan; every step guarded so the thread never dies."""
        try:
            next_health = time.monotonic() + self._health_every
            next_rescan = time.monotonic() + self._rescan_every
            while not self._stopping.is_set():
                now = time.monotonic()
                self._last_tick = time.time()
                if now >= next_health or self._wake.is_set():
                    self._wake.clear()
                    for root in self._roots:
                        self._guard(f"root {root.path}", self._check_root, root, now)
                    next_health = now + self._health_every
                if now >= next_rescan:
                    with self._lock:
                        for root in self._roots:
                            self._rescans.setdefault(root.path, "periodic")
                    next_rescan = now + self._rescan_every
                self._guard("scan", self._scan_requested)
                self._guard("settle", self._settle_pass)
                self._guard("hand-on", self._flush)
                self._wake.wait(self._tick)
        except BaseException:
            logger.exception("watch: checker thread failed; no more frames will be found")
            raise
        finally:
            if not self._stopping.is_set():
                logger.critical("watch: checker thread stopped unexpectedly")

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """Run one step; log a failure (the same one at most once a minute), never raise."""
        try:
            fn(*args)
        except Exception as exc:
            key = f"{what}: {type(exc).__name__}: {exc}"
            now = time.monotonic()
            if now - self._errors.get(key, -math.inf) >= 60.0:
                self._errors[key] = now
                logger.opt(exception=True).error("watch: {} failed: {}", what, exc)

    # supervision ------------------------------------------------------------------------

    def _check_root(self, root: _Root, now: float) -> None:
        """Missing, back, replaced (remount / re-create) or observer dead: act and log once."""
        if self._stopping.is_set():
            return
        try:
            st = os.stat(root.path)
            problem = None if stat_module.S_ISDIR(st.st_mode) else "not a folder"
        except OSError as exc:
            st, problem = None, exc.strerror or str(exc)
        if st is None or problem is not None:
            if not root.reported_missing:
                logger.warning(
                    "watch: {} is missing ({}); watching for it to return", root.path, problem
                )
                root.reported_missing = True
                root.missing_since = time.time()
            root.present = False
            root.reason = f"missing: {problem}"
            self._stop_observer(root)
            return
        identity = (st.st_dev, st.st_ino)
        if not root.present:
            reason = "startup"
            if root.reported_missing:
                away = time.time() - (root.missing_since or time.time())
                logger.info("watch: {} is back after {:.0f} s; rescanning it", root.path, away)
                reason = "returned"
            root.present, root.reported_missing, root.missing_since = True, False, None
            root.next_start = 0.0
            self._request_rescan(root, reason)
            self._start_observer(root, identity, now)
            return
        if root.observer is None:
            if now >= root.next_start:
                self._start_observer(root, identity, now)
            return
        if identity != root.identity:
            logger.warning(
                "watch: {} was replaced (remounted or re-created); restarting its observer",
                root.path,
            )
            self._restart_observer(root, identity, now)
        elif not _observer_alive(root.observer):
            logger.error(
                "watch: {} observer for {} stopped; restarting it and rescanning",
                root.mode,
                root.path,
            )
            self._restart_observer(root, identity, now)

    def _restart_observer(self, root: _Root, identity: tuple[int, int], now: float) -> None:
        self._stop_observer(root)
        root.restarts += 1
        # The first restart is at once; an observer that keeps dying within a minute of
        # its start is retried less and less often (up to once a minute).
        lived = now - root.started_at
        root.next_start = now + (root.backoff if lived < 60.0 else 0.0)
        root.backoff = min(max(root.backoff * 2, 1.0), 60.0) if lived < 60.0 else 0.0
        self._request_rescan(root, "restart")
        if now >= root.next_start:
            self._start_observer(root, identity, now)

    def _choose_mode(self, root: _Root) -> tuple[str, str]:
        real = os.path.realpath(root.path)
        mount = mount_for(real, _read_mounts()) if sys.platform.startswith("linux") else None
        root.fs_type = mount.fs_type if mount else None
        if root.inotify_failed:
            return "polling", "inotify limit reached"
        requested = self.config.watch.mode
        network = mount is not None and is_network_filesystem(mount.fs_type)
        if requested == "inotify" and network and mount is not None:
            logger.warning(
                "watch: {} is on a {} share but watch.mode = inotify: files written by "
                "other machines are only found by rescans; use mode auto or polling",
                root.path,
                mount.fs_type,
            )
        if requested != "auto":
            return requested, f"watch.mode = {requested}"
        if network and mount is not None:
            return "polling", f"{mount.fs_type} share at {mount.mount_point}"
        return "inotify", f"local filesystem ({root.fs_type or 'unknown'})"

    def _start_observer(self, root: _Root, identity: tuple[int, int], now: float) -> None:
        mode, reason = self._choose_mode(root)
        observer: BaseObserver | None = None
        try:
            observer = _new_observer(mode, self._poll)
            observer.schedule(
                root.handler,
                str(root.path),
                recursive=True,
                event_filter=_EVENT_FILTER,
                follow_symlink=root.path.is_symlink(),
            )
            observer.start()
        except OSError as exc:
            if observer is not None:
                self._dispose(observer)
            if mode == "inotify" and exc.errno in _INOTIFY_LIMIT_ERRNOS:
                logger.warning(
                    "watch: {}: inotify limit reached ({}); polling every {:g} s instead "
                    "(raise fs.inotify.max_user_watches / max_user_instances to use inotify)",
                    root.path,
                    exc.strerror or exc,
                    self._poll,
                )
                root.inotify_failed = True
                self._start_observer(root, identity, now)
                return
            self._observer_failed(root, now, exc)
            return
        except Exception as exc:
            if observer is not None:
                self._dispose(observer)
            self._observer_failed(root, now, exc)
            return
        root.observer, root.mode, root.reason = observer, mode, reason
        root.identity, root.started_at = identity, now
        poll = f", every {self._poll:g} s" if mode == "polling" else ""
        logger.info("watch: watching {} ({}{}: {})", root.path, mode, poll, reason)
        self._request_rescan(root, "restart" if root.restarts else "startup")

    def _observer_failed(self, root: _Root, now: float, exc: BaseException) -> None:
        root.observer = None
        root.reason = f"observer failed: {exc}"
        root.backoff = min(max(root.backoff * 2, 1.0), 60.0)
        root.next_start = now + root.backoff
        logger.error(
            "watch: cannot watch {} ({}); retrying in {:.0f} s, rescans continue",
            root.path,
            exc,
            root.backoff,
        )

    def _stop_observer(self, root: _Root) -> None:
        observer, root.observer = root.observer, None
        if observer is not None:
            self._dispose(observer)

    def _dispose(self, observer: BaseObserver) -> None:
        """Stop an observer in a helper thread: stopping joins emitters, and an emitter
        stuck in a stat on a dead hard-mounted share must not block the checker."""

        def reap() -> None:
            with contextlib.suppress(Exception):
                observer.stop()
            with contextlib.suppress(RuntimeError):
                observer.join(10.0)

        reaper = threading.Thread(target=reap, name="observd-watch-reaper", daemon=True)
        reaper.start()
        self._reapers = [r for r in self._reapers if r.is_alive()] + [reaper]

    # scans ------------------------------------------------------------------------------

    def _request_rescan(self, root: _Root, reason: str) -> None:
        with self._lock:
            self._rescans.setdefault(root.path, reason)

    def _scan_requested(self) -> None:
        with self._lock:
            rescans, self._rescans = self._rescans, {}
            dirs, self._dirs = self._dirs, set()
        for root in self._roots:
            reason = rescans.get(root.path)
            if reason is not None and root.present and not self._stopping.is_set():
                self._rescan(root, reason)
        for root_path, folder in sorted(dirs):
            if not self._stopping.is_set():
                self._scan_tree(root_path, folder)

    def _rescan(self, root: _Root, reason: str) -> None:
        """Reconcile one root with the disk: new versions become candidates."""
        started = time.monotonic()
        seen, added = self._scan_tree(root.path, root.path)
        if seen is None:
            return  # vanished mid-scan; the health check reports it
        stale = [
            p for p in self._handed if p not in seen and p.is_relative_to(root.path)
        ]
        for path in stale:
            if not os.path.lexists(path):
                del self._handed[path]
        self._last_rescan = time.time()
        log = logger.info if reason != "periodic" or added else logger.debug
        log(
            "watch: {} scan of {}: {} frame file(s), {} new, {:.1f} s",
            reason,
            root.path,
            len(seen),
            added,
            time.monotonic() - started,
        )

    def _scan_tree(self, root: Path, folder: Path) -> tuple[set[Path] | None, int]:
        """Add every unhandled, unknown frame file under ``folder`` as a candidate."""
        seen: set[Path] = set()
        found: list[tuple[Path, os.stat_result]] = []
        try:
            for path in find_frame_files([folder], self.config):
                if self._stopping.is_set():
                    break
                if _hidden_below(root, path.parent):
                    continue
                seen.add(path)
                with self._lock:
                    if path in self._candidates:
                        continue
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                if not stat_module.S_ISREG(st.st_mode):
                    continue
                version = (st.st_size, st.st_mtime_ns)
                if self._handed.get(path) == version or self._is_known(path, st):
                    continue
                found.append((path, st))
        except FileNotFoundError:
            return None, 0
        # One settle clock for the whole scan, started once every file has been seen:
        # the files a scan finds (written while observd was down, or missed) settle in
        # the same pass and reach the queue together, so the worker can put them in
        # DATE-OBS order instead of taking the first one it happens to get.
        now = time.monotonic()
        added = 0
        with self._lock:
            for path, st in found:
                if path not in self._candidates:
                    self._candidates[path] = _Candidate(
                        path,
                        root,
                        first_seen=now,
                        next_check=now + self._settle,
                        version=(st.st_size, st.st_mtime_ns),
                        baseline_at=now,
                        stat=st,
                    )
                    added += 1
        return seen, added

    def _is_known(self, path: Path, st: os.stat_result) -> bool:
        if self._known is None:
            return False
        try:
            return bool(self._known(path, st))
        except Exception as exc:
            key = f"known: {type(exc).__name__}: {exc}"
            if time.monotonic() - self._errors.get(key, -math.inf) >= 60.0:
                self._errors[key] = time.monotonic()
                logger.opt(exception=True).error(
                    "watch: known() failed for {} ({}); treating it as new", path, exc
                )
            return False

    # settling ---------------------------------------------------------------------------

    def _settle_pass(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [(c, c.gen) for c in self._candidates.values() if c.next_check <= now]
        for candidate, gen in due:
            if self._stopping.is_set():
                return
            self._settle_one(candidate, gen)

    def _drop(self, candidate: _Candidate, gen: int) -> None:
        with self._lock:
            if self._candidates.get(candidate.path) is candidate and candidate.gen == gen:
                del self._candidates[candidate.path]

    def _settle_one(self, c: _Candidate, gen: int) -> None:
        """One look at one candidate: drop it, wait longer, or hand it on."""
        now = time.monotonic()
        try:
            st = os.stat(c.path)
        except FileNotFoundError:
            logger.debug("watch: {} vanished before it settled", c.path)
            self._drop(c, gen)
            return
        except OSError as exc:
            if not c.warned_error:
                c.warned_error = True
                logger.warning("watch: cannot stat {} ({}); will retry", c.path, exc)
            c.next_check = now + self._settle
            return
        if not stat_module.S_ISREG(st.st_mode):
            self._drop(c, gen)
            return
        version = (st.st_size, st.st_mtime_ns)
        with self._lock:
            if c.gen != gen:
                return  # an event arrived meanwhile; it already rescheduled the check
            if c.baseline_at is None or version != c.version:
                if c.version is not None and version != c.version:
                    self._warn_if_growing(c, now, st.st_size)
                c.version, c.baseline_at, c.stat = version, now, st
                c.next_check = now + self._settle
                return
            stable_for = now - c.baseline_at
            if stable_for < self._settle:
                c.next_check = c.baseline_at + self._settle
                return
        # Unchanged for settle_seconds: already handed on, already known, or check it.
        if c.check is None or (c.check.size, c.check.mtime_ns) != version:
            if self._handed.get(c.path) == version or self._is_known(c.path, st):
                self._drop(c, gen)
                return
            try:
                c.check = check_fits_structure(c.path)
            except FileNotFoundError:
                self._drop(c, gen)
                return
            except OSError as exc:
                c.check = FitsCheck("unreadable", f"cannot read: {exc}", *version)
            if (c.check.size, c.check.mtime_ns) != version:
                with self._lock:  # changed while we read; look again next tick
                    if c.gen == gen:
                        c.baseline_at = None
                        c.next_check = now
                return
        check = c.check
        if check.state in ("incomplete", "unreadable"):
            if stable_for < self._incomplete:
                with self._lock:
                    if c.gen == gen:
                        c.next_check = now + min(self._settle, self._incomplete - stable_for)
                return
            logger.warning(
                "watch: {} unchanged for {:.0f} s but {} ({}); handing it on anyway",
                c.path,
                stable_for,
                "incomplete" if check.state == "incomplete" else "unreadable",
                check.detail,
            )
        elif check.state == "not_fits":
            logger.info("watch: {} is not a FITS file ({}); handing it on", c.path, check.detail)
        with self._lock:
            if self._candidates.get(c.path) is not c or c.gen != gen:
                return
            del self._candidates[c.path]
        self._handed[c.path] = version
        self._ready.append(SettledFile(c.path, c.root, *version, check.state, check.detail))
        logger.debug("watch: {} settled ({} bytes, {})", c.path, version[0], check.state)

    def _warn_if_growing(self, c: _Candidate, now: float, size: int) -> None:
        if not c.warned_growing and now - c.first_seen >= self._incomplete:
            c.warned_growing = True
            logger.warning(
                "watch: {} still changing after {:.0f} s ({} bytes); "
                "it will be handed on once it stops",
                c.path,
                now - c.first_seen,
                size,
            )

    def _flush(self) -> None:
        """Move settled files to the output queue; when it is full keep them and retry."""
        while self._ready:
            try:
                self.output.put_nowait(self._ready[0])
            except queue.Full:
                if self._queue_full_since is None:
                    self._queue_full_since = time.monotonic()
                    logger.debug("watch: output queue full; {} waiting", len(self._ready))
                return
            self._ready.popleft()
            self._handed_count += 1
        self._queue_full_since = None


def _hidden_below(root: Path, folder: Path) -> bool:
    """True when a folder between ``root`` and ``folder`` is hidden (as find_frame_files
    skips them); False for folders outside ``root``."""
    try:
        parts = folder.relative_to(root).parts
    except ValueError:
        return False
    return any(part.startswith(".") for part in parts)

