"""Fixtures shared by the denoiser tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def kriss(data_dir: Path) -> Path:
    """The real KRISS fast/slow-scan pairs; skips with the reason when absent."""
    path = data_dir / "kriss-sem-pairs"
    if not path.is_dir():
        pytest.skip(f"KRISS pairs not found at {path}")
    return path
