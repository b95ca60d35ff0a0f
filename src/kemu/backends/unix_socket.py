"""Listening UNIX sockets and pidfiles that kemu owns, and removes only if still its own.

QEMU 7.2 unlinks whatever is at a socket path before binding (a regular
file included) and so silently takes over the path of a QEMU that is still
listening there.  kemu is more careful:

- a path that exists and is not a socket is refused, and left alone;
- a socket someone still accepts connections on is refused (kemu connects
  to find out); only a stale one (connection refused) is replaced;
- the socket file gets its mode (0600) from ``fchmod`` on the socket before
  ``bind``, which Linux applies to the new file: the process-wide umask is
  never changed (other threads create files meanwhile);
- at exit a path is unlinked only if it is still the file kemu created
  (same device and inode), so a successor's socket or pidfile survives.

Pidfiles are created 0600, as QEMU's ``qemu_write_pidfile`` creates them.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass

from kemu.errors import ConfigError

#: The mode of every UNIX socket kemu listens on.
SOCKET_MODE = 0o600
PIDFILE_MODE = 0o600


@dataclass(frozen=True)
class OwnedPath:
    """A file kemu created: removed only while it is still that file."""

    path: str
    dev: int
    ino: int

    @classmethod
    def of(cls, path: str) -> "OwnedPath":
        st = os.lstat(path)
        return cls(path, st.st_dev, st.st_ino)

    def remove(self) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == (self.dev, self.ino):
                os.unlink(self.path)
        except OSError:
            pass


def _clear_stale_socket(path: str, what: str) -> None:
    """Remove ``path`` if it is a socket nobody listens on; refuse anything else there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ConfigError(f"{what}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{what}: exists and is not a socket (left as it is)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        pass                         # a leftover of a process that is gone
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno != errno.ECONNREFUSED:
            raise ConfigError(f"{what}: cannot tell whether it is in use: {e.strerror or e}"
                              ) from None
    else:
        raise ConfigError(f"{what}: another process is listening on it")
    finally:
        probe.close()
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ConfigError(f"{what}: cannot remove the stale socket: {e.strerror}") from None


def listen_unix(path: str, what: str, backlog: int = 16) -> tuple[socket.socket, OwnedPath]:
    """A socket listening on ``path`` (mode 0600) and the file it made; ``what`` names
    the option in errors (``-qmp unix:/x``)."""
    _clear_stale_socket(path, what)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), SOCKET_MODE)     # taken by the file bind() creates
        sock.bind(path)
        owned = OwnedPath.of(path)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise ConfigError(f"{what}: cannot listen: {e.strerror or e}") from None
    return sock, owned


def write_pidfile(path: str) -> OwnedPath:
    """Write this process's pid to ``path`` (created 0600, as QEMU does)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK,
                     PIDFILE_MODE)
    except OSError as e:
        raise ConfigError(f"-pidfile {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"-pidfile {path}: not a regular file")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as e:
        raise ConfigError(f"-pidfile {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    return OwnedPath(path, st.st_dev, st.st_ino)
