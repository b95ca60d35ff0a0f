import pytest

from kemu.errors import GuestBuildError
from kemu.testing.stdio_console import KEMU, Console, cpu_seconds  # noqa: F401


@pytest.fixture(scope="session")
def guest():
    """The default aarch64 guest, built into the cache on first use."""
    from kemu.guest.debian import default_guest
    try:
        return default_guest("aarch64", show_progress=False)
    except GuestBuildError as e:
        pytest.skip(f"cannot build the default guest here: {e}")


@pytest.fixture
def console_factory():
    consoles = []

    def start(*args: str) -> Console:
        c = Console(list(args))
        consoles.append(c)
        return c

    yield start
    for c in consoles:
        c.close()
