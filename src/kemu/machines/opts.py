"""QEMU's option-list syntax: ``value,key=value,...``, where ``,,`` is a literal comma
(so ``file=a,,b.img`` names the file ``a,b.img``)."""

from __future__ import annotations


def split_opts(text: str) -> list[str]:
    """Split at single commas; each ``,,`` becomes one comma inside its part."""
    parts = [""]
    i = 0
    while i < len(text):
        c = text[i]
        if c == ",":
            if text.startswith(",,", i):
                parts[-1] += ","
                i += 2
                continue
            parts.append("")
        else:
            parts[-1] += c
        i += 1
    return parts
