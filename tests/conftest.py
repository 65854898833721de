import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """The real sample datasets beside the clone (never copied into the project)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA} (it lies beside the clone in CI)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def scan_cache_in_a_temporary_folder(tmp_path_factory):
    """The data checks' cache (pairs.cache_folder) goes to a folder of the test session, not the user's ~/.cache."""
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
