"""The night's running coadds: one per target grid and filter, checkpointed and published.

:class:`Coadds` owns the :class:`observd.stack.RunningCoadd` objects of the night. Each
accepted light is folded into its coadd; the products (the coadd FITS with its EXPMAP
and FRAMES extensions, a PNG quick-look, the target's RGB composite once it has three
filters) are written atomically after each frame or at most every
``stack.publish_seconds``, and the coadd's state is checkpointed every
``stack.checkpoint_frames`` frames. The catalog's ``coadds`` table records which frames
each checkpoint holds, so after a crash the coadd resumes from its checkpoint and the
frames stacked after it are added again, exactly once.

A one-shot-colour light goes into three coadds, the target's R, G and B
(:meth:`Coadds.add_colour`), which all record that frame; they are published together
and the colour composite is made once. Nothing here grows with the number of frames
but the FRAMES table (one row per light, from one indexed query).

Writing is off the frame's path: a checkpoint (~27 bytes per grid pixel, ~0.5 GB at
4096 px, fsynced) and the products (FITS, PNG, RGB) are snapshotted in memory when they
are due -- by a copier thread, while the next light is read, calibrated, measured and
warped; the coadd waits for the copy before that light changes it -- and written by one
background thread, in order, while the next lights are processed; the catalog learns
about a file only once it is complete (the pipeline thread records it at the next frame
or at :meth:`Coadds.flush`, which waits for every write). Each checkpoint has its own
file name, so the catalog's row always names a checkpoint holding exactly the frames it
lists, whatever a crash interrupts.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from astropy.io import fits
from loguru import logger

from observd import __version__, render
from observd.catalog import Catalog, json_text
from observd.config import StackConfig
from observd.products import Products, atomic_write, atomic_write_fits
from observd.register import Grid
from observd.stack import FrameInput, RunningCoadd, SkyFit, fit_sky, load_kernels

__all__ = ["Coadds"]


@dataclass
class _Live:
    """One coadd in memory, with what is not yet on disk."""

    id: int
    coadd: RunningCoadd
    target_id: int
    night: str
    target: str  # display name of the grid: "M 51", "M 51 #2"
    filter: str
    grid: Grid
    source_filter: str  # the lights' filter (a colour camera's "IRCUT" for its R, G, B)
    since_checkpoint: int = 0
    published: float = 0.0  # monotonic time of the last product write
    dirty: bool = False
    masters: set[int] = field(default_factory=set)
    # the latest copy of the coadd's arrays (a checkpoint's, or the pixels of its
    # products) running on the copier beside the next light: the coadd takes no frame
    # until it is done (the copier runs them in order: the latest is the last)
    snapshot: Future[Any] | None = None


class Coadds:
    """Fold accepted lights into their coadds and publish them.

    Parameters
    ----------
    config
        The ``[stack]`` section.
    catalog, products
        Where the state and the products go.
    """

    def __init__(self, config: StackConfig, catalog: Catalog, products: Products) -> None:
        self.config = config
        self.catalog = catalog
        self.products = products
        self._live: dict[tuple[int, str], _Live] = {}
        # one writer thread: checkpoints and products in the order they were due
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="observd-writer")
        # one copier: a checkpoint's snapshot of the arrays, made while the next light is
        # read, calibrated, measured and warped (which do not touch the coadds)
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="observd-copier")
        # checkpoint copies reuse these arrays (faulted in once, in the background, when
        # a coadd is made: the first copy into fresh memory took ~1 s at 4096 px, which
        # the next light waited for); a set is taken by a copy, given back after its write
        self._spares: list[dict[str, np.ndarray]] = []
        self._spares_lock = threading.Lock()
        self._pending: list[tuple[Future[None], Callable[[], None]]] = []

    def add(
        self,
        *,
        frame: dict[str, Any],
        target: dict[str, Any],
        grid: Grid,
        image: np.ndarray,
        weight: np.ndarray,
        fwhm: float,
        transparency: float,
        gain: float | None,
        masters: list[int],
    ) -> tuple[bool, str | None]:
        """Fold one aligned light (ADU on the grid) into its coadd.

        Returns
        -------
        (stacked, reason)
            ``reason`` says why a frame was refused (too many pixels disagree).
        """
        self.collect()
        filt = frame["filter"] or ""
        live, result = self._fold(frame, target, grid, filt, image, weight, fwhm,
                                  transparency, gain, masters)  # fmt: skip
        self._after([live] if result[0] else [])
        return result

    def add_colour(
        self,
        *,
        frame: dict[str, Any],
        target: dict[str, Any],
        grid: Grid,
        channels: dict[str, np.ndarray],
        weight: np.ndarray,
        fwhm: float,
        transparency: float,
        gain: float | None,
        masters: list[int],
    ) -> dict[str, tuple[bool, str | None]]:
        """Fold the colours of one aligned one-shot-colour light into the target's coadds
        of those names (``"R"``, ``"G"``, ``"B"``), which all record that frame.

        The three are published together, and the colour composite made once.

        Returns
        -------
        dict
            colour -> ``(stacked, reason)`` as for :meth:`add`.
        """
        self.collect()
        results, done = {}, []
        for name, image in channels.items():
            live, results[name] = self._fold(frame, target, grid, name, image, weight, fwhm,
                                              transparency, gain, masters)  # fmt: skip
            if results[name][0]:
                done.append(live)
        self._after(done)
        return results

    def _fold(
        self, frame: dict[str, Any], target: dict[str, Any], grid: Grid, filt: str,
        image: np.ndarray, weight: np.ndarray, fwhm: float, transparency: float,
        gain: float | None, masters: list[int],
    ) -> tuple[_Live, tuple[bool, str | None]]:  # fmt: skip
        live = self._get(target, filt, grid, frame["filter"] or "")
        self._snapshot_taken(live)
        # the image stays in ADU: the coadd divides by the exposure time as it folds the
        # frame in, and evaluates the sky's polynomial there (no full-frame pass for either)
        per_second = 1.0 / float(frame["exptime"])
        fit = fit_sky(image)
        sky = SkyFit(tuple(c * per_second for c in fit.coeffs), fit.rms * per_second, fit.shape)
        report = live.coadd.add(
            FrameInput(
                image,
                unit=per_second,
                sky_rms=sky.rms,
                exptime=frame["exptime"],
                fwhm=fwhm if np.isfinite(fwhm) else 3.0,
                frame_id=frame["id"],
                coverage=weight,
                scale=1.0 / transparency if transparency > 0 else 1.0,
                sky=sky,
                gain=gain,
            )
        )
        for record, why in report.revised:  # the warm-up's joint judgement, now final
            if why:
                self._refused(record.frame_id, why)
        if not report.accepted:
            return live, (False, report.reason)
        live.masters.update(m for m in masters if m)
        live.since_checkpoint += 1
        live.dirty = True
        if filt in (frame["filter"] or "", "G"):  # a colour frame's weight: its green's
            self.catalog.db["lights"].update(frame["id"], {"weight": report.weight})
        return live, (True, None)

    def _after(self, lives: list[_Live]) -> None:
        """Checkpoint and publish the coadds a frame went into, when due."""
        for live in lives:
            if live.since_checkpoint >= self.config.checkpoint_frames:
                self._checkpoint(live)
        now = time.monotonic()
        due = [lv for lv in lives if now - lv.published >= self.config.publish_seconds]
        for live in due:
            self._publish(live)
        for target_id in dict.fromkeys(lv.target_id for lv in due):
            self._rgb(target_id)

    def reset(self, target_ids: list[int]) -> None:
        """Forget the coadds of these target grids (a restack): rows, checkpoints and
        products go; the raw frames and the lights' verdicts stay."""
        self.collect(wait=True)
        for key in [k for k in self._live if k[0] in target_ids]:
            del self._live[key]
        for target_id in target_ids:
            for row in self.catalog.db["coadds"].rows_where("target_id = ?", [target_id]):
                for path in (row["checkpoint"], row["fits"], row["png"]):
                    if path:
                        Path(path).unlink(missing_ok=True)
                self.catalog.db["coadds"].delete(row["id"])
            target = self.catalog.target(target_id)
            self.products.rgb(target["night"], target["name"]).unlink(missing_ok=True)

    def _refused(self, frame_id: int, reason: str) -> None:
        """A frame the coadd's warm-up judgement left out after all."""
        self.catalog.db["lights"].update(frame_id, {"verdict": "rejected", "reason": reason})
        self.catalog.update_frame(frame_id, {"status": "rejected", "reason": reason})
        self.catalog.log_event("stack", "rejected", reason, frame_id=frame_id)

    def publish_pending(self) -> None:
        """Write the products of coadds changed since their last write once
        ``publish_seconds`` have passed (the daemon calls this when it is idle, so the
        last frames of a burst show up without waiting for the next frame)."""
        self.collect()
        now = time.monotonic()
        due = [
            live
            for live in self._live.values()
            if live.dirty and now - live.published >= self.config.publish_seconds
        ]
        for live in due:
            self._publish(live)
        for target_id in dict.fromkeys(live.target_id for live in due):
            self._rgb(target_id)

    def flush(self) -> None:
        """Write every coadd's products and checkpoint (end of a run, shutdown)."""
        published = []
        for live in self._live.values():
            if live.dirty or live.since_checkpoint:
                self._checkpoint(live)
                self._publish(live)
                published.append(live.target_id)
        for target_id in dict.fromkeys(published):
            self._rgb(target_id)
        self.collect(wait=True)

    def _background(self, write: Callable[[], None], record: Callable[[], None]) -> None:
        """``write`` on the writer thread; ``record`` (catalog updates) on this one, once
        ``write`` has finished (see :meth:`collect`)."""
        self._pending.append((self._writer.submit(write), record))

    def collect(self, *, wait: bool = False) -> None:
        """Record the finished background writes in the catalog, oldest first (with
        ``wait``, after waiting for all of them). Each :meth:`add` does it; a daemon
        calls it when idle (:meth:`observd.pipeline.Pipeline.idle`) so that the catalog
        does not wait for the next light to know the latest products."""
        while self._pending:
            future, record = self._pending[0]
            if not (wait or future.done()):
                return
            self._pending.pop(0)
            try:
                future.result()
            except Exception:  # a full disk must not stop the night: the next write retries
                logger.exception("writing a coadd product or checkpoint failed")
                continue
            record()
        if wait:  # and what the records queued (old checkpoints removed): the writer
            self._writer.submit(lambda: None).result()  # runs its tasks in order

    # ----------------------------------------------------------------- state

    def _get(self, target: dict[str, Any], filt: str, grid: Grid, source: str) -> _Live:
        key = (target["id"], filt)
        if key in self._live:
            return self._live[key]
        # the compiled kernels of the seed and of the running add load beside this
        # light and the next instead of in the seeding light (once per process)
        self._copier.submit(load_kernels, self.config.warmup)
        rows = list(
            self.catalog.db["coadds"].rows_where(
                "target_id = ? and filter = ?", [target["id"], filt]
            )
        )
        if rows:
            coadd = self._resume(rows[0], grid)
            coadd_id = rows[0]["id"]
        else:
            coadd = self._new_coadd(grid)
            coadd_id = int(
                self.catalog.db["coadds"]
                .insert(
                    {
                        "night": target["night"],
                        "target_id": target["id"],
                        "target": target["name"],
                        "filter": filt,
                        "n_frames": 0,
                    }
                )  # fmt: skip
                .last_pk
            )
        live = _Live(
            coadd_id, coadd, target["id"], target["night"], target["name"], filt, grid, source
        )
        self._live[key] = live
        return live

    def _new_coadd(self, grid: Grid) -> RunningCoadd:
        coadd = RunningCoadd(grid.shape, warmup=self.config.warmup, clip=self.config.clip_sigma)
        self._prepare_spare(coadd)
        return coadd

    def _prepare_spare(self, coadd: RunningCoadd) -> None:
        """Have a set of checkpoint arrays of this coadd's kind ready (made and faulted
        in on the writer thread, beside the warm-up) unless one is free already."""
        like = {k: (a.shape, a.dtype) for k, a in coadd.state_arrays().items()}

        def prepare() -> None:
            with self._spares_lock:
                if any(_fits(spare, like) for spare in self._spares):
                    return
            try:
                spare = _new_set(like)
                for a in spare.values():
                    a.fill(0)  # touch every page now, not in a frame's wait
            except MemoryError:  # the checkpoint will allocate its copy itself
                logger.warning("no memory for a spare checkpoint copy")
                return
            with self._spares_lock:
                self._spares.append(spare)

        # on the writer thread: the copier must stay free for the snapshots a light
        # may wait for
        self._writer.submit(prepare)

    def _copy_state(self, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """The checkpoint's snapshot (on the copier thread): the coadd's arrays copied
        into a spare set (or new arrays); returns the snapshot and the set to give back."""
        arrays = {k: v for k, v in state.items()
                  if isinstance(v, np.ndarray) and not k.startswith("buffer")}  # fmt: skip
        like = {k: (a.shape, a.dtype) for k, a in arrays.items()}
        with self._spares_lock:
            spare = next((s for s in self._spares if _fits(s, like)), None)
            if spare is not None:
                self._spares.remove(spare)
        if spare is None:
            spare = _new_set(like)
        for k, a in arrays.items():
            np.copyto(spare[k], a)
        return {**state, **spare}, spare

    def _resume(self, row: dict[str, Any], grid: Grid) -> RunningCoadd:
        """The coadd as of its last checkpoint (the caller re-adds the frames after it)."""
        path = row.get("checkpoint")
        if path:
            try:
                with np.load(path, allow_pickle=False) as data:
                    coadd = RunningCoadd.from_state(dict(data))
                self._prepare_spare(coadd)
                logger.info("coadd {} {}: resumed from its checkpoint ({} frames)",
                            row["target"], row["filter"], coadd.n_frames)  # fmt: skip
                return coadd
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("coadd {} {}: checkpoint unusable ({}); rebuilding",
                               row["target"], row["filter"], exc)  # fmt: skip
        return self._new_coadd(grid)

    def _checkpoint(self, live: _Live) -> None:
        state = live.coadd.state()
        # the live arrays change with the next frame: the writer gets a copy, made on
        # the copier thread (~0.1 s at 4096 px, against 0.5-1 s for writing and syncing
        # it) while the next light goes through the stages before its coadd
        live.snapshot = snapshot = self._copier.submit(self._copy_state, state)
        frame_ids, n_frames = list(live.coadd.frame_ids), live.coadd.n_frames
        path = self.products.state_dir() / f"coadd_{live.id}_{n_frames}.npz"

        def record() -> None:
            row = self.catalog.db["coadds"].get(live.id)
            self.catalog.db["coadds"].update(
                live.id,
                {
                    "checkpoint": str(path),
                    "checkpoint_frames": json.dumps(frame_ids),
                    "n_frames": n_frames,
                },
            )
            old = row.get("checkpoint")
            if old and old != str(path):
                # on the writer: unlinking 0.45 GB (4096 px) took the light 0.2 s
                self._writer.submit(_remove, Path(old))

        def write() -> None:
            copied, spare = snapshot.result()
            try:
                atomic_write(path, lambda fh: np.savez(fh, **copied))
            finally:
                with self._spares_lock:
                    self._spares.append(spare)

        self._background(write, record)
        live.since_checkpoint = 0

    @staticmethod
    def _snapshot_taken(live: _Live) -> None:
        """Wait until the copy of the coadd's arrays for its checkpoint is made (before
        the coadd changes); a failed copy fails that checkpoint's write, which logs it."""
        if live.snapshot is not None:
            concurrent.futures.wait([live.snapshot])
            live.snapshot = None

    # ----------------------------------------------------------------- products

    def _publish(self, live: _Live) -> None:
        coadd = live.coadd
        if coadd.n_frames == 0:
            return
        fits_path = self.products.stack(live.night, live.target, live.filter)
        png_path = self.products.stack(live.night, live.target, live.filter, ".png")
        lights = self._lights(live)
        header = self._header(live, lights)
        table = _frames_table(lights, {r.frame_id: r for r in coadd.frames})
        # the pixels are computed on the copier thread, beside the next light; a seeded
        # coadd waits for them before it changes (a warming-up one is read from a frozen
        # copy: its joint combination takes a while and need not hold up the next light)
        frozen = coadd.frozen()
        source = frozen if frozen is not None else coadd
        pixels = self._copier.submit(lambda: {"image": source.image,
                                              "exposure": source.exposure})  # fmt: skip
        if frozen is None:
            live.snapshot = pixels
        row = {
            "n_frames": coadd.n_frames,
            "fits": str(fits_path),
            "png": str(png_path),
            "stats": json_text(coadd.stats),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        max_size = self.config.png_max_size

        def write() -> None:
            image, exposure = pixels.result()["image"], pixels.result()["exposure"]
            expmap = fits.ImageHDU(exposure, name="EXPMAP")
            expmap.header["BUNIT"] = "s"
            atomic_write_fits(fits_path, fits.HDUList(
                [fits.PrimaryHDU(image, header), expmap, table]))  # fmt: skip
            render.quicklook(_fill_cores(image), png_path, max_size=max_size)

        self._background(write, lambda: self.catalog.db["coadds"].update(live.id, row))
        live.published, live.dirty = time.monotonic(), False

    def _header(self, live: _Live, lights: list[dict[str, Any]]) -> fits.Header:
        """The coadd FITS header (the dates from the frames in it)."""
        coadd = live.coadd
        records = {r.frame_id for r in coadd.frames}
        header = fits.Header()
        if live.grid.wcs is not None:
            header.update(live.grid.wcs.to_header())
        header["BUNIT"] = ("adu/s", "per second, at the reference transparency")
        header["EXPTIME"] = (coadd.total_exptime, "s, total exposure used")
        header["NCOMBINE"] = coadd.n_frames
        header["FILTER"] = live.filter
        header["OBJECT"] = live.target
        dates = [x["date_obs"] for x in lights if x["frame_id"] in records and x["date_obs"]]
        if dates:
            header["DATE-OBS"] = min(dates)[:23]
            header["DATE-END"] = max(dates)[:23]
        header["FWHM"] = (round(float(coadd.fwhm), 3), "px, weighted mean of the frames")
        header["CREATOR"] = f"observd {__version__}"
        for master_id in sorted(live.masters):
            m = self.catalog.master(master_id)
            header.add_history(f"master {m['kind']} v{m['version']} {m['path'].rsplit('/', 1)[-1]}")
        return header

    def _lights(self, live: _Live) -> list[dict[str, Any]]:
        """Every light of this coadd's target grid and filter: the columns the products
        need, through the (night, target, filter) index."""
        target = self.catalog.target(live.target_id)
        return self.catalog.lights(
            "l.night = ? and l.target = ? and l.filter is ? and l.target_id = ?",
            [live.night, target["target"], live.source_filter or None, live.target_id],
            columns="l.frame_id, l.verdict, l.reason, l.fwhm, l.transparency, f.path, "
            "f.date_obs, f.status",
        )

    def _rgb(self, target_id: int) -> None:
        """The target's colour composite once three of its filters have coadds."""
        mine = {f: v for (tid, f), v in self._live.items() if tid == target_id}
        live = next(iter(mine.values()))
        mapping = render.choose_mapping(sorted(mine))
        if mapping is None:
            return
        used = {f: v for f, v in mine.items() if v.coadd.n_frames}
        sources = {f: v.coadd.frozen() or v.coadd for f, v in used.items()}
        images = self._copier.submit(lambda: {f: c.image for f, c in sources.items()})
        for f, v in used.items():
            if sources[f] is v.coadd:  # seeded: wait for the read before it changes
                v.snapshot = images
        path, max_size = self.products.rgb(live.night, live.target), self.config.png_max_size

        def write() -> None:
            channels = {f: _fill_cores(image) for f, image in images.result().items()}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", render.RenderWarning)
                try:
                    rgb = render.rgb_composite(channels, mapping)
                except (KeyError, ValueError) as exc:
                    logger.warning("{}: no colour composite: {}", live.target, exc)
                    return
            render.to_png(rgb, path, max_size=max_size)

        self._background(write, lambda: None)


def _remove(path: Path) -> None:
    """Delete a superseded checkpoint (on the writer thread; a failure is logged)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        logger.warning("could not remove the old checkpoint {}: {}", path, exc)


def _new_set(like: dict[str, tuple[Any, Any]]) -> dict[str, np.ndarray]:
    """Uninitialised arrays of these names, shapes and types."""
    return {k: np.empty(shape, dtype) for k, (shape, dtype) in like.items()}


def _fits(spare: dict[str, np.ndarray], like: dict[str, tuple[Any, Any]]) -> bool:
    """The spare set has arrays of exactly these names, shapes and types."""
    return spare.keys() == like.keys() and all(
        (spare[k].shape, spare[k].dtype) == like[k] for k in like)


def _frames_table(lights: list[dict[str, Any]], records: dict[int, Any]) -> fits.BinTableHDU:
    """Every light of a coadd's target and filter with its fate (used + weight, or
    rejected + reason)."""
    files, dates, fates, reasons, weights, fwhms, transp = [], [], [], [], [], [], []
    for light in lights:
        rec = records.get(light["frame_id"])
        files.append(light["path"].rsplit("/", 1)[-1])
        dates.append(light["date_obs"] or "")
        if rec is not None:
            fates.append("used")
        else:
            fates.append("rejected" if light["verdict"] == "rejected" else light["status"] or "")
        reasons.append("" if rec is not None else light["reason"] or "")
        weights.append(rec.weight if rec is not None else 0.0)
        fwhms.append(light["fwhm"] if light["fwhm"] is not None else np.nan)
        transp.append(light["transparency"] if light["transparency"] is not None else np.nan)
    def text(values: list[str], width: int) -> np.ndarray:  # FITS strings are bytes
        return np.array([v.encode("utf-8", "replace")[:width] for v in values], f"S{width}")

    columns = [
        fits.Column("FILE", "200A", array=text(files, 200)),
        fits.Column("DATE_OBS", "32A", array=text(dates, 32)),
        fits.Column("FATE", "16A", array=text(fates, 16)),
        fits.Column("REASON", "200A", array=text(reasons, 200)),
        fits.Column("WEIGHT", "D", array=np.array(weights, dtype=np.float64)),
        fits.Column("FWHM", "D", array=np.array(fwhms, dtype=np.float64)),
        fits.Column("TRANSP", "D", array=np.array(transp, dtype=np.float64)),
    ]
    return fits.BinTableHDU.from_columns(columns, name="FRAMES")


def _fill_cores(image: np.ndarray, largest: int = 15) -> np.ndarray:
    """For the pictures only: small no-data holes enclosed by data (the cores of stars
    saturated in every frame) filled with their brightest neighbours, so a bright star is
    drawn bright instead of with a black dot; the FITS keeps them NaN (no data). No-data
    regions touching the grid's edge, or larger than ``largest`` px across, stay NaN."""
    nan = ~np.isfinite(image)
    if not nan.any():
        return image
    n, labels, stats, _ = cv2.connectedComponentsWithStats(nan.view(np.uint8), connectivity=8)
    x, y, w, h = (stats[:, k] for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP,
                                        cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))  # fmt: skip
    ny, nx = image.shape
    small = (w <= largest) & (h <= largest) & (x > 0) & (y > 0) & (x + w < nx) & (y + h < ny)
    small[0] = False  # the background label (the data)
    if not small[1:].any():
        return image
    holes = small[labels]
    out = image.copy()
    for _ in range(largest // 2 + 1):
        grown = cv2.dilate(np.where(np.isfinite(out), out, -np.inf).astype(np.float32),
                           np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)  # fmt: skip
        fill = holes & np.isfinite(grown)
        out[fill] = grown[fill]
        holes &= ~fill
        if not holes.any():
            break
    return out
