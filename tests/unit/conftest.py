import shutil

import pytest


@pytest.fixture
def need():
    """``need("dtc")`` returns the tool's path or skips the test, saying why."""
    def find(tool: str) -> str:
        path = shutil.which(tool)
        if path is None:
            pytest.skip(f"{tool} is not installed (scripts/bootstrap.sh --test installs it)")
        return path
    return find
