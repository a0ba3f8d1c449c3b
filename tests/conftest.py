"""Shared test fixtures.

Real SEM data is read from ``$CEMI_DATA`` (default ``../shared/data`` beside the
checkout).  Tests that need it use the ``data_dir`` fixture, which skips with
the reason when the folder is absent; CI has it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path:
    """Folder of the real SEM data sets (``$CEMI_DATA`` or ``../shared/data``)."""
    return Path(os.environ.get("CEMI_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real SEM data folder; skips the test when it is absent."""
    path = real_data_dir()
    if not path.is_dir():
        pytest.skip(
            f"real SEM data not found at {path}: set CEMI_DATA to the shared/data folder "
            "(CI provides it)"
        )
    return path
