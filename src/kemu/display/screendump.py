"""Screen captures: QMP ``screendump`` (PPM by default, or PNG) and the API's Pillow image.

PPM is written by hand (a ``P6`` header and RGB bytes, as QEMU writes it);
PNG through Pillow.  The file is written beside its name and renamed into
place, so a reader never sees half an image.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from kemu.display.surface import DisplaySurface
from kemu.errors import KemuError

FORMATS = ("ppm", "png")


class ScreendumpError(KemuError):
    """The capture could not be written (a bad format, a path that cannot be written)."""


def surface_image(surface: DisplaySurface):
    """The surface as a Pillow RGB image."""
    from PIL import Image
    width, height, rgb = surface.to_rgb()
    return Image.frombytes("RGB", (width, height), rgb)


def write_screendump(surface: DisplaySurface, filename: str | Path, fmt: str = "ppm") -> None:
    if fmt not in FORMATS:
        raise ScreendumpError(f"Invalid parameter 'format': {fmt} (ppm or png)")
    path = Path(filename)
    if fmt == "ppm":
        width, height, rgb = surface.to_rgb()
        data = b"P6\n%d %d\n255\n" % (width, height) + rgb
    else:
        import io
        buf = io.BytesIO()
        surface_image(surface).save(buf, format="PNG")
        data = buf.getvalue()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    except OSError as e:
        raise ScreendumpError(f"screendump: cannot write {filename}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        raise ScreendumpError(f"screendump: cannot write {filename}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
