"""Which image files of a run cannot be decoded, found before any work is done.

A run that meets an unreadable image after a long fit wastes that fit; ``unreadable`` finds them all first. It opens
each file and runs PIL's ``verify()``: the header, and for PNG every chunk and its checksum, without decoding pixels
(about a tenth of a full decode; ``python -m benchmarks.readme_figures --parts verify`` measures both). A file that passes and still fails to decode later (e.g. a truncated JPEG, whose ``verify()`` reads the
header only) stops the run there with ``ImageReadError`` naming it, as before.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, UnidentifiedImageError

__all__ = ["unreadable"]

# What PIL raises for a missing, unreadable, truncated or corrupt file (as in fre_torch.features.images).
_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _reason(path: Path) -> str | None:
    """Why ``path`` cannot be decoded, in a few words; None when it can."""
    try:
        with Image.open(path) as img:
            img.verify()
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
