"""Shared fixtures: real files in temp folders, the real frames in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    """The real frames beside the checkout; the test is skipped when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real frames not found at {SHARED_DATA}")
    return SHARED_DATA


def write_config(
    folder: Path,
    *,
    incoming: str = "camera",
    timezone: str = "America/Los_Angeles",
    extra: str = "",
) -> Path:
    """A config file in ``folder`` whose catalog and products live there too."""
    path = folder / "observd.toml"
    path.write_text(
        "[paths]\n"
        f'incoming = ["{incoming}"]\n'
        'products = "products"\n'
        'catalog = "observd.sqlite"\n'
        "[site]\n"
        f'timezone = "{timezone}"\n' + extra,
        encoding="utf-8",
    )
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    (tmp_path / "camera").mkdir()
    return write_config(tmp_path)
