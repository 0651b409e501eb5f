"""``observd run``: the watcher feeds one pipeline worker, all night, under systemd.

The main thread is the worker: it takes settled files from the watcher's bounded queue
(back-pressure: the watcher holds what does not fit), puts each burst in DATE-OBS
order and takes the files through :class:`observd.pipeline.Pipeline`, one at a time.
Signal handlers only set flags, so a frame in hand is always finished: SIGTERM/SIGINT
checkpoint the coadds and stop, SIGHUP reloads the config, SIGUSR1 ends the night now.
Between frames the worker pings systemd's watchdog and writes
``<products>/state/daemon.json`` for the dome page and ``observd status``; when idle it
publishes pending stacks, rebuilds stacks whose masters were superseded, and ends the
night (waiting lights, provisional frames, the morning summary) once it is over.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from loguru import logger

from observd.catalog import Catalog, utcnow
from observd.config import ConfigError, load_config
from observd.ingest import in_time_order
from observd.pipeline import Pipeline
from observd.products import Products, atomic_write_bytes
from observd.status import STATE_FILE
from observd.watch import FrameWatcher, SettledFile

__all__ = ["Daemon", "SystemdNotifier"]


class SystemdNotifier:
    """The sd_notify protocol: datagrams to ``$NOTIFY_SOCKET`` (a no-op without it).

    Attributes
    ----------
    watchdog_seconds
        ``WatchdogSec`` of the unit when systemd asked this process for pings.
    """

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        if address and address.startswith("@"):  # abstract namespace
            address = "\0" + address[1:]
        self._address = address
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_seconds = int(usec) / 1e6 if usec and usec.isdigit() and mine else None
        self._failed = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> None:
        """Send ``READY=1``, ``STATUS=...``, ``WATCHDOG=1``, ``STOPPING=1``..."""
        if not self._address:
            return
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.connect(self._address)
                s.sendall(message)
            self._failed = False
        except OSError as exc:
            if not self._failed:  # once, not every two seconds
                logger.warning("systemd notify to {!r} failed: {}", self._address, exc)
            self._failed = True


class Daemon:
    """The long-running process behind ``observd run``.

    Parameters
    ----------
    config_path
        The config file (re-read on SIGHUP); None means built-in defaults.
    serve_web
        Serve the dome page; default: ``daemon.serve_web`` of the config.
    notifier
        systemd notification; default from the environment.
    """

    def __init__(
        self,
        config_path: Path | None,
        *,
        serve_web: bool | None = None,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.config_path = config_path
        self.config = load_config(config_path)
        self._serve_web = serve_web
        self.notifier = notifier or SystemdNotifier()
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._finish_now = threading.Event()
        self._finish_requested = 0.0
        self._stop_after_finish = False
        self.catalog: Catalog | None = None
        self.pipeline: Pipeline | None = None
        self.watcher: FrameWatcher | None = None
        self.web: Any = None
        self._known_local = threading.local()
        self._started = utcnow()
        self._processed = 0
        self._failed = 0
        self._in_hand: str | None = None
        self._last_event: dict[str, str] | None = None
        self._last_state = 0.0
        self._last_frame = time.monotonic()  # a frame of any kind taken through
        self._unfinished = False  # frames since the night was last finished
        self._last_calibration: float | None = None  # a master may have changed since
        self._nights: set[str] = set()  # nights with frames since the last finish
        self.finished_count = 0
        self._state = "starting"
        self.on_ready: Callable[[], None] | None = None
        """Called once the watcher and the dome page are up (the demo starts its camera)."""

    @property
    def state_name(self) -> str:
        """starting, running, stopping or stopped."""
        return self._state

    # ----------------------------------------------------------------- control

    def request_stop(self) -> None:
        """Finish the frame in hand, checkpoint the coadds and stop (thread- and
        signal-safe)."""
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def request_finish(self, *, then_stop: bool = False) -> None:
        """End the night as soon as the queue is empty: waiting lights processed with what
        exists, provisional frames stacked, superseded stacks rebuilt, summary written."""
        self._stop_after_finish = self._stop_after_finish or then_stop
        self._finish_requested = time.monotonic()
        self._finish_now.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop, SIGHUP reloads, SIGUSR1 ends the night (main thread)."""

        def stop(signum: int, _frame: FrameType | None) -> None:
            if self._stop.is_set():
                logger.warning("{} again: already stopping", signal.Signals(signum).name)
            self.request_stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, lambda *_: self.request_reload())
        signal.signal(signal.SIGUSR1, lambda *_: self.request_finish())

    # ----------------------------------------------------------------- main loop

    def run(self) -> int:
        """Run until asked to stop; returns the exit status."""
        self._start_components()
        self._state = "running"
        self._write_state(force=True)
        self.notifier.notify("READY=1", f"STATUS={self._status_line(self._current_night())}")
        logger.info("observd running: watching {}", _paths(self.config.paths.incoming))
        if self.on_ready is not None:
            self.on_ready()
        try:
            while not self._stop.is_set():
                if self._reload.is_set():
                    self._do_reload()
                burst = self._next_burst()
                for settled in burst:
                    if self._stop.is_set():
                        break  # the rest is found again by the next startup scan
                    self._process(settled)
                    self._heartbeat()
                if not burst:
                    self._idle()
                self._heartbeat()
        finally:
            self._shutdown()
        return 0

    def _next_burst(self) -> list[SettledFile]:
        """The settled files available now (waiting up to 0.5 s for the first), in
        DATE-OBS order, as the camera wrote them."""
        assert self.watcher is not None
        try:
            first = self.watcher.output.get(timeout=0.5)
        except queue.Empty:
            return []
        items = [first]
        deadline = time.monotonic() + 0.5
        while len(items) < self.config.daemon.burst:
            try:
                items.append(self.watcher.output.get_nowait())
            except queue.Empty:
                # the watcher may still be handing on the rest of a settle pass
                if not self.watcher.handing_on or time.monotonic() > deadline:
                    break
                time.sleep(0.002)
        if len(items) == 1:
            return items
        by_path = {s.path: s for s in items}
        return [by_path[p] for p in in_time_order(list(by_path), self.config)]

    def _process(self, settled: SettledFile) -> None:
        assert self.pipeline is not None and self.catalog is not None
        path = settled.path
        self._in_hand = str(path)
        what = "processed"
        try:
            result = self.pipeline.process(path)
            if result is None:
                what = "vanished before it could be read"
            else:
                frame = self.catalog.frame(result.frame_id)
                what = f"{frame['type'] or 'file'}: {frame['status']}"
                if frame["reason"]:
                    what += f" ({frame['reason']})"
                if frame["night"]:
                    self._nights.add(frame["night"])
                if frame["type"] in ("bias", "dark", "darkflat", "flat"):
                    self._last_calibration = time.monotonic()
            self._processed += 1
        except Exception as exc:  # one file must never stop the night
            self._failed += 1
            what = f"failed: {type(exc).__name__}: {exc}"
            logger.exception("{}: processing failed", path)
            self._record_failure(path, exc)
        finally:
            self._in_hand = None
        self._last_frame = time.monotonic()
        self._unfinished = True
        self._last_event = {"time": utcnow(), "path": str(path), "what": what}

    def _record_failure(self, path: Path, exc: Exception) -> None:
        """Say in the catalog why a file failed, when the catalog itself still works."""
        assert self.catalog is not None
        try:
            frame = self.catalog.frame_by_path(path.absolute())
            reason = f"failed: {type(exc).__name__}: {exc}"
            if frame is not None:
                self.catalog.update_frame(frame["id"], {"status": "failed", "reason": reason})
            self.catalog.log_event(
                "daemon", "failed", reason, frame_id=frame["id"] if frame else None,
                details={"path": str(path)},
            )  # fmt: skip
        except Exception as inner:  # the catalog is the problem (disk full, ...)
            logger.error("cannot record the failure of {} in the catalog: {}", path, inner)

    # ----------------------------------------------------------------- idle work

    def _idle(self) -> None:
        """Work that waits for a quiet moment; each step guarded so the loop survives."""
        assert self.pipeline is not None
        self._guard("publish", self.pipeline.idle)
        now = time.monotonic()
        cfg = self.config.daemon
        if (
            self._last_calibration is not None
            and now - self._last_calibration >= cfg.rebuild_delay_seconds
        ):
            self._last_calibration = None
            self._guard("rebuild", self.pipeline.rebuild_stale, self._heartbeat)
        # wait for the files still settling, but not for one that never stops growing
        patience = 2.0 * self.config.watch.incomplete_seconds
        if self._finish_now.is_set() and (
            self._watcher_quiet() or now - self._finish_requested > patience
        ):
            self._finish_now.clear()
            self._finish("asked")
            if self._stop_after_finish:
                self.request_stop()
        elif (
            self._unfinished
            and now - self._last_frame >= cfg.finish_quiet_seconds
            and self._past_dawn()
        ):
            self._finish(f"no new frame for {cfg.finish_quiet_seconds:.0f} s")
        if self.watcher is not None and not self.watcher.running and not self._stop.is_set():
            logger.error("watch: the watcher stopped; starting it again")
            self._guard("watcher restart", self._restart_watcher)

    def _watcher_quiet(self) -> bool:
        """Nothing waits to settle and nothing is queued: the night's files are in."""
        if self.watcher is None:
            return True
        status = self.watcher.status()
        return (
            status.candidates == 0
            and status.waiting_for_queue == 0
            and self.watcher.output.empty()
        )

    def _past_dawn(self) -> bool:
        """True when every night seen since the last finish is over (or unknown)."""
        try:
            from observd.summary import night_end
        except ImportError:  # pragma: no cover - summary is part of the package
            return True
        now = datetime.now().astimezone()
        for night in self._nights:
            try:
                if night_end(self.config, night) > now:
                    return False
            except Exception as exc:  # no site position: quiet time alone decides
                logger.debug("night end of {} unknown: {}", night, exc)
        return True

    def _finish(self, why: str) -> None:
        """End the night: everything waiting is processed, stacks written, summaries."""
        assert self.pipeline is not None and self.catalog is not None
        logger.info("ending the night ({}): waiting lights, rebuilds, products", why)
        self._guard("finish", self.pipeline.finish)
        self._last_calibration = None
        self._unfinished = False
        nights, self._nights = sorted(self._nights), set()
        for night in nights:
            self._guard(f"summary {night}", self._write_summary, night)
        self.finished_count += 1
        self.catalog.log_event("daemon", "night finished", why, details={"nights": nights})
        self._write_state(force=True)

    def _write_summary(self, night: str) -> None:
        try:
            from observd.summary import write_summary
        except ImportError:  # pragma: no cover - summary is part of the package
            return
        assert self.catalog is not None
        path = write_summary(self.config, self.catalog, night)
        logger.info("morning summary of {}: {}", night, path)

    def _guard(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            logger.exception("{} failed; carrying on", what)

    # ----------------------------------------------------------------- heartbeat

    def _heartbeat(self) -> None:
        """Between frames: the watchdog ping, the state file and the systemd status."""
        self._write_state()

    def _write_state(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_state < self.config.daemon.state_seconds:
            return
        self._last_state = now
        state = self.state()
        try:
            path = Products(self.config.paths.products).state_dir() / STATE_FILE
            atomic_write_bytes(path, json.dumps(state, indent=1, default=str).encode())
        except OSError as exc:  # disk full: the daemon carries on, the page goes stale
            logger.error("cannot write the daemon state file: {}", exc)
        lines = [f"STATUS={self._status_line(state['night'])}"]
        if self.notifier.watchdog_seconds:
            lines.append("WATCHDOG=1")
        self.notifier.notify(*lines)

    def state(self) -> dict[str, Any]:
        """What ``daemon.json`` holds (see HELPERS.md / README: the state contract)."""
        watcher = self.watcher.status().to_dict() if self.watcher is not None else None
        waiting = self.watcher.output.qsize() if self.watcher is not None else 0
        disk: dict[str, int | None] = {}
        folders = [self.config.paths.products, self.config.paths.catalog.parent]
        for folder in [*folders, *self.config.paths.incoming]:
            try:
                disk[str(folder)] = shutil.disk_usage(folder).free
            except OSError:
                disk[str(folder)] = None
        return {
            "pid": os.getpid(),
            "started": self._started,
            "updated": utcnow(),
            "state": self._state,
            "queue": waiting,
            "in_hand": self._in_hand,
            "processed": self._processed,
            "failed": self._failed,
            "last_event": self._last_event,
            "watcher": watcher,
            "disk_free": disk,
            "night": self._current_night(),
            "nights_finished": self.finished_count,
            "web": self.web.url if self.web is not None else None,
            "config": str(self.config_path) if self.config_path else None,
        }

    def _current_night(self) -> str | None:
        if self.catalog is None:
            return None
        rows = list(self.catalog.db.query("select max(night) as n from frames"))
        return rows[0]["n"] if rows else None

    def _status_line(self, night: str | None) -> str:
        """Tonight's counts, for ``systemctl status``."""
        if self.catalog is None or night is None:
            return "waiting for the first frame"
        counts = {
            r["status"]: r["n"]
            for r in self.catalog.db.query(
                "select status, count(*) as n from frames where night = ? group by status",
                [night],
            )
        }
        queue_len = self.watcher.output.qsize() if self.watcher is not None else 0
        parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        return f"night {night}: {parts or 'no frames'}; queue {queue_len}"

    # ----------------------------------------------------------------- lifecycle

    def _start_components(self) -> None:
        config = self.config
        self.catalog = Catalog(config.paths.catalog)
        self.pipeline = Pipeline(config, self.catalog)
        self._last_calibration = time.monotonic()  # a crash may have left stale stacks
        latest = self._current_night()
        if latest is not None:  # a crash may also have left the night unfinished
            self._nights.add(latest)
            self._unfinished = True
        self._start_watcher()
        if self._serve_web if self._serve_web is not None else config.daemon.serve_web:
            self._start_web()

    def _start_watcher(self) -> None:
        self.watcher = FrameWatcher(
            self.config,
            queue.Queue(maxsize=self.config.daemon.queue_size),
            known=self._known,
            incomplete_seconds=self.config.watch.incomplete_seconds,
        )
        self.watcher.start()

    def _restart_watcher(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self._start_watcher()

    def _start_web(self) -> None:
        try:
            from observd.web import WebServer
        except ImportError as exc:
            logger.warning("dome page not available: {}", exc)
            return
        try:
            self.web = WebServer(self.config)
            self.web.start()
            logger.info("dome page at {}", self.web.url)
        except Exception as exc:  # port taken, ...: the pipeline matters more
            logger.error("dome page cannot start: {}", exc)
            self.web = None

    def _stop_components(self) -> None:
        if self.web is not None:
            self._guard("dome page stop", self.web.stop)
            self.web = None
        if self.watcher is not None:
            self._guard("watcher stop", self.watcher.stop)
            self.watcher = None
        if self.pipeline is not None:
            self._guard("checkpoint", self.pipeline.coadds.flush)
        if self.catalog is not None:
            self.catalog.close()
            self.catalog = None
        self.pipeline = None

    def _known(self, path: Path, stat: os.stat_result) -> bool:
        """Watcher thread: True when this version of the file was taken through the
        pipeline already (a frame only recorded before a crash is not: it is redone)."""
        catalog = getattr(self._known_local, "catalog", None)
        if catalog is None:
            catalog = Catalog(self.config.paths.catalog, readonly=True)
            self._known_local.catalog = catalog
        row = catalog.frame_by_path(path.absolute())
        return bool(
            row
            and row["size"] == stat.st_size
            and row["mtime_ns"] == stat.st_mtime_ns
            and row["status"] != "recorded"
        )

    def _do_reload(self) -> None:
        self._reload.clear()
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            logger.error("SIGHUP: config not reloaded, keeping the running one: {}", exc)
            return
        logger.info("SIGHUP: reloading {}", self.config_path)
        self._stop_components()
        self.config = config
        self._start_components()
        self._write_state(force=True)

    def _shutdown(self) -> None:
        self._state = "stopping"
        self.notifier.notify("STOPPING=1", "STATUS=checkpointing the coadds")
        logger.info("observd stopping: checkpointing the coadds")
        self._write_state(force=True)
        self._stop_components()
        self._state = "stopped"
        self._write_state(force=True)
        logger.info("observd stopped after {} files", self._processed)


def _paths(paths: Any) -> str:
    return ", ".join(str(p) for p in paths) or "nothing (paths.incoming is empty)"
