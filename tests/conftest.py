"""Fixtures every test package shares. Database fixtures live in tests/db_fixtures.py."""
import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.db_fixtures"]

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real corpora in ../shared/data. Tests marked `corpus` skip without them, but fail
    under CI=true, where the corpora must be present."""
    if not any(SHARED_DATA.glob("*/manifest.csv")):
        message = f"the corpora are not in {SHARED_DATA}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return SHARED_DATA
