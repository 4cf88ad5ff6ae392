"""Which image files of a run cannot be decoded, found before any work is done.

A run that meets an unreadable image after a long fit wastes that fit; ``unreadable`` finds them all first, so that
what the run would fail on, the check finds (and ``--skip_unreadable`` leaves out). It opens each file and runs
PIL's ``verify()``: for PNG every chunk and its checksum, without decoding pixels (about a tenth of a full decode;
``python -m benchmarks.readme_figures --parts verify`` measures both). For every other format ``verify()`` reads the
header only (a truncated JPEG passes it), so those files are decoded: JPEGs at 1/8 scale, which still reads every
byte of the compressed stream.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = ["unreadable"]

# Formats whose verify() checks every byte of the pixel data (PNG: every chunk and its CRC); others are decoded.
_VERIFIED = frozenset({"PNG"})
# What PIL raises for a missing, unreadable, truncated or corrupt file (as in fre_torch.features.images).
_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _reason(path: Path) -> str | None:
    """Why ``path`` cannot be decoded, in a few words; None when it can."""
    try:
        with Image.open(path) as img:
            checked = img.format in _VERIFIED
            img.verify()
        if not checked:
            # verify() reads only the header of these formats: decode them, as the run will. JPEGs at 1/8 scale
            # (draft: the DCT is cut short, every byte of the stream is still read, so truncation still shows).
            with Image.open(path) as img:
                if img.format == "JPEG":
                    img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
                img.load()
    except UnidentifiedImageError:
        return "not an image"
    except FileNotFoundError:
        return "missing"
    except _ERRORS as exc:
        return " ".join(str(exc).replace(os.fspath(path), "").split()) or type(exc).__name__
    return None


def unreadable(paths: Iterable[str | os.PathLike]) -> dict[Path, str]:
    """The files of ``paths`` that cannot be decoded, each with the reason, in the order given.

    Args:
        paths: image files (training, test images and masks alike).

    Returns:
        ``{path: reason}``; empty when every file is readable.
    """
    found = {}
    for path in map(Path, paths):
        reason = _reason(path)
        if reason is not None:
            found[path] = reason
    return found
