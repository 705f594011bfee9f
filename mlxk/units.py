"""One size convention for every view (CLI, web page, health reasons, job progress): decimal SI units, as the Hub
and disk vendors count: 1 KB = 1,000 bytes, 1 MB = 1,000,000 bytes. mlxk/server/static/app.js mirrors human_size.
"""
from __future__ import annotations


def human_size(num: int | float | None) -> str:
    """`216 KB`, `116.1 MB`: whole bytes and kilobytes, one decimal above."""
    if num is None:
        return "-"
    num = float(num)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(num) < 1000 or unit == "TB":
            return f"{num:.0f} {unit}" if unit in ("B", "KB") else f"{num:.1f} {unit}"
        num /= 1000
    return f"{num:.1f} PB"


def compact_size(num: int | None) -> str:
    """The same decimal units in mlx-knife's spelling (`178B`, `60.9KB`), for the fields its JSON API defines."""
    if num is None:
        return "-"
    if num < 1000:
        return f"{num}B"
    value = float(num)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000 or unit == "TB":
            return f"{value:.1f}{unit}"
    return f"{value:.1f}TB"
