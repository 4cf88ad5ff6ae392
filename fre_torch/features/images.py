"""Image files and the MVTec AD folder layout.

Images are decoded with PIL exactly as the reference pipeline does (any mode -> RGB, LANCZOS resize to a square, no
crop) and returned as ``uint8`` CHW tensors; conversion to float and ImageNet normalisation happen later, on the
device. The MVTec AD layout is::

    <root>/<category>/train/good/*                          normal training images
    <root>/<category>/test/good/*                           normal test images (label 0)
    <root>/<category>/test/<defect>/*                       anomalous test images (label 1)
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png pixel masks (0 = normal, > 0 = anomalous)
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import PIL
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from .files import atomic_write
from .resample import lanczos_resize

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageReadError",
    "load_image",
    "load_mask",
    "image_size",
    "list_images",
    "list_categories",
    "TestSample",
    "MVTecCategory",
    "ImageDataset",
    "PreprocessCache",
    "FeatureCache",
    "make_loader",
    "SMALL_CPU_CORES",
    "cpu_count",
    "decode_images",
    "device_decodable",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
"""Suffixes recognised as images, compared case-insensitively."""

_LAYOUT = "<root>/<category>/train/good/*, <root>/<category>/test/<defect>/* (good = normal)"

# Everything PIL raises for a missing, unreadable, corrupt, truncated or oversized file.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class ImageReadError(ValueError):
    """An image or mask file cannot be read; the message names the file.

    Constructible from the message alone, so that a DataLoader worker re-raises it with its own type.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)


def _check_size(value: int, what: str = "size (pixels per side)") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


def _check_hw(size: int | Sequence[int], what: str = "size") -> tuple[int, int]:
    """An image size: ``S`` (a square) or ``(height, width)``, positive ints -> ``(height, width)``."""
    values = (size, size) if isinstance(size, int) and not isinstance(size, bool) else tuple(size) \
        if isinstance(size, (tuple, list)) else None
    if values is None or len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0
                                                 for v in values):
        raise ValueError(f"{what} must be a positive int or (height, width) of positive ints, got {size!r}")
    return values[0], values[1]


def _decode(
    path: str | os.PathLike, convert: Callable[[Image.Image], Image.Image], what: str = "image",
    data: bytes | None = None, draft: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Opens ``path`` (or decodes ``data``, the file's bytes already read), applies ``convert`` (PIL image -> 8-bit
    PIL image).

    ``draft``: a JPEG may be decoded at a reduced scale (1/2, 1/4 or 1/8, in the DCT: much less work) as long as
    the result stays at least this ``(width, height)``; other formats ignore it.

    Returns ``uint8 (C, H', W')`` of the converted image and the file's own ``(H, W)``.

    Any failure to open, decode (corrupt or truncated data) or convert becomes an ``ImageReadError`` naming the file.
    """
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            own = (img.height, img.width)
            if draft is not None and img.format == "JPEG" and img.mode in ("L", "RGB"):
                img.draft(img.mode, draft)
            img.load()
            return _pil_to_uint8(convert(img)), own
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"cannot read {what} {os.fspath(path)}: {exc}", path) from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> ``RGB``: PIL's own conversion (alpha dropped), 16-bit grey rescaled to 8 bits."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        # PIL's I;16 -> RGB conversion clips at 255; map 0..65535 to 0..255 instead (rounded).
        img = img.convert("I").point(lambda v: v / 257 + 0.5).convert("L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning; colours are unchanged
    return img.convert("RGB")


def _pil_to_uint8(img: Image.Image) -> torch.Tensor:
    """8-bit PIL image with C bands -> ``uint8 (C, H, W)`` tensor (without numpy)."""
    width, height = img.size
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.view(height, width, len(img.getbands())).permute(2, 0, 1).contiguous()


def _read_image(path: str | os.PathLike, size: int | tuple[int, int],
                data: bytes | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """``load_image`` plus the original ``(H, W)`` of the file (decoded from ``data`` when given)."""
    h, w = _check_hw(size)
    return _decode(path, lambda img: _resized_rgb(img, w, h), data=data, draft=(_DRAFT_GAP * w, _DRAFT_GAP * h))


# A JPEG is decoded at a reduced DCT scale only while it stays at least this many times the target size, so the
# LANCZOS filter that follows still reduces by 2x or more and sees every detail it would keep (Pillow's reducing_gap
# idea). The data sets we measure are smaller than twice the input size, so it changes none of their figures; it
# pays on camera-sized JPEGs (BENCHMARKS.md).
_DRAFT_GAP = 2


def _resized_rgb(img: Image.Image, w: int, h: int) -> Image.Image:
    """The reference's LANCZOS resize to ``(w, h)`` and RGB. A grey image is resized before it becomes RGB: the same
    pixels (the three channels are equal, and each is filtered alone), a third of the filtering."""
    if img.mode == "L":
        return img.resize((w, h), Image.Resampling.LANCZOS).convert("RGB")
    return _to_rgb(img).resize((w, h), Image.Resampling.LANCZOS)


class _EntryStore:
    """Cache entries as byte blobs under hex keys: files ``<root>/<key[:2]>/<key><SUFFIX>``, written atomically
    (temporary name, then rename, so concurrent workers or an interrupted run leave no partial entry), or a dict in
    this object's memory when ``root`` is None. Reading a missing or unreadable file gives None; a write that fails
    (disk full, read-only folder) is swallowed: a cache that cannot be written only costs its speed-up."""

    SUFFIX = ""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.root = None if root is None else Path(root)
        self._memory: dict[str, bytes] = {}
        if self.root is not None and self.root.exists() and not self.root.is_dir():
            raise ValueError(f"cache path {self.root} exists and is not a folder; pass a folder for the cache")

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{self.SUFFIX}"

    def _read(self, key: str) -> bytes | None:
        if self.root is None:
            return self._memory.get(key)
        try:
            return self._path(key).read_bytes()
        except OSError:
            return None

    def _write(self, key: str, blob: bytes) -> None:
        if self.root is None:
            self._memory[key] = blob
            return
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path) as tmp:
                tmp.write_bytes(blob)
        except OSError:  # the folder is unusable (e.g. its parent is a file): nothing was written
            pass


class PreprocessCache(_EntryStore):
    """An on-disk cache of preprocessed images, so repeated runs skip decoding and resizing.

    Entries are keyed by the SHA-256 of the file's bytes together with every setting that shapes the result (output
    size, resampling filter, colour conversion, this cache format and the PIL version, whose resampling may change
    between releases). A file edited in place, or the same file read at another size, gets a new key: an entry can
    never be stale, only unused. Names and modification times play no part. Hashing costs one read of the file
    (~1 GB/s); decoding and LANCZOS resizing, which the cache saves, cost 5-20 ms per image.

    Each entry is one file ``<root>/<key[:2]>/<key>.u8``: a 20-byte header (magic, original H and W, stored H and W)
    and the ``uint8 (3, H, W)`` pixels. Entries are written to a temporary name and renamed, so concurrent workers or
    an interrupted run leave no partial entry; an unreadable entry is ignored and rewritten.

    Args:
        root: the cache folder (created on first write; safe to delete at any time), or None to keep the entries
            in this object's memory.
    """

    _MAGIC = b"FRE2"
    _HEADER = struct.Struct("<4sIIII")
    SETTINGS = f"fre_torch-preprocess-v2|RGB|LANCZOS|PIL-{PIL.__version__}"
    SUFFIX = ".u8"

    def key(self, data: bytes, size: int | tuple[int, int]) -> str:
        """The entry name for a file's bytes preprocessed to ``size`` (a square side or ``(height, width)``)."""
        h, w = _check_hw(size)
        digest = hashlib.sha256(data)
        digest.update(f"|{self.SETTINGS}|size={h}x{w}".encode())
        return digest.hexdigest()

    def get(self, key: str, size: int | tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """``(uint8 (3, H, W), (original H, W))`` of an entry, or None when it is absent or unreadable."""
        h, w = _check_hw(size)
        blob = self._read(key)
        if blob is None or len(blob) != self._HEADER.size + 3 * h * w:
            return None
        magic, height, width, stored_h, stored_w = self._HEADER.unpack_from(blob)
        if magic != self._MAGIC or (stored_h, stored_w) != (h, w):
            return None
        pixels = torch.frombuffer(bytearray(blob[self._HEADER.size:]), dtype=torch.uint8).view(3, h, w)
        return pixels, (height, width)

    def put(self, key: str, image: torch.Tensor, orig_size: tuple[int, int]) -> None:
        """Store an entry atomically; a failure to write (disk full, read-only folder) only costs the speed-up."""
        h, w = image.shape[-2:]
        self._write(key, self._HEADER.pack(self._MAGIC, orig_size[0], orig_size[1], h, w)
                    + image.contiguous().numpy().tobytes())

    def read(self, path: str | os.PathLike, size: int | tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
        """``_read_image`` through the cache: a hit skips decoding and resizing."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ImageReadError(f"cannot read image {os.fspath(path)}: {exc}", path) from exc
        key = self.key(data, size)
        hit = self.get(key, size)
        if hit is not None:
            return hit
        image, orig = _read_image(path, size, data=data)
        self.put(key, image, orig)
        return image, orig


class FeatureCache(_EntryStore):
    """An on-disk cache of per-image feature vectors, so repeated runs skip the backbone as well as decoding.

    An entry is keyed by the SHA-256 of the exact ``uint8`` input image (its pixels and shape, i.e. after decoding
    and resizing) together with a ``settings`` string that the caller derives from everything else that shapes the
    features (``FREDetector`` hashes its backbone's weights, layers, input size, grid, normalisation, precision,
    device type, compilation and the torch version into it). Changing any of them, or one pixel, changes the key: an
    entry can never be stale, only unused. Each entry is one file ``<root>/<key[:2]>/<key>.f32``: an 8-byte header
    (magic, number of values) and the float32 values, written atomically; an unreadable entry is ignored and
    rewritten. Use its own folder (``evaluate`` uses ``<cache>/features``); safe to delete at any time.

    Args:
        root: the cache folder (created on first write), or None to keep the entries in this object's memory, for
            one run that reads the same images twice (``evaluate``'s cross-fitting pass).
    """

    _MAGIC = b"FRF1"
    _HEADER = struct.Struct("<4sI")
    VERSION = "fre_torch-features-v1"
    SUFFIX = ".f32"

    def key(self, image: torch.Tensor, settings: str) -> str:
        """The entry name for one ``uint8 (3, H, W)`` CPU image under ``settings``."""
        if image.dtype != torch.uint8 or image.device.type != "cpu":
            raise ValueError(f"FeatureCache keys uint8 CPU images, got {image.dtype} on {image.device}")
        h = hashlib.sha256(image.contiguous().numpy().data)
        h.update(f"|{tuple(image.shape)}|{self.VERSION}|{settings}".encode())
        return h.hexdigest()

    def get(self, key: str, n: int) -> torch.Tensor | None:
        """The ``(n,)`` float32 vector of an entry, or None when it is absent, unreadable or of another length."""
        blob = self._read(key)
        if blob is None or len(blob) != self._HEADER.size + 4 * n:
            return None
        magic, stored = self._HEADER.unpack_from(blob)
        if magic != self._MAGIC or stored != n:
            return None
        return torch.frombuffer(bytearray(blob[self._HEADER.size:]), dtype=torch.float32)

    def put(self, key: str, values: torch.Tensor) -> None:
        """Store a ``(n,)`` float32 CPU vector atomically; a failure to write only costs the speed-up."""
        values = values.detach().to("cpu", torch.float32).contiguous().view(-1)
        self._write(key, self._HEADER.pack(self._MAGIC, values.numel()) + values.numpy().tobytes())


def load_image(path: str | os.PathLike, size: int | tuple[int, int]) -> torch.Tensor:
    """Reads an image as the reference pipeline does: any mode -> RGB, LANCZOS resize to ``size``, no crop.

    16-bit greyscale (``I;16*``) is rescaled to 8 bits (``round(v / 257)``); alpha is dropped, not composited; EXIF orientation is
    ignored (as in the reference).

    Args:
        path: an image file (.png, .jpg, .jpeg, .bmp, .tif, .tiff or anything else PIL decodes).
        size: side of the square output, or ``(height, width)``, pixels.

    Returns:
        ``uint8 (3, H, W)`` tensor, not normalised.

    Raises:
        ImageReadError: the file is missing, unreadable, corrupt or truncated (the message names it).
        ValueError: ``size`` is not a positive int or pair of them.
    """
    return _read_image(path, size)[0]


def load_mask(path: str | os.PathLike, size: int | None = None) -> torch.Tensor:
    """Reads a ground-truth mask: NEAREST resize to ``size x size``, any value > 0 is anomalous.

    Args:
        path: a mask image file (any mode; modes other than ``L`` go through PIL's conversion to ``L``).
        size: side of the square output; ``None`` keeps the file's own ``(H, W)``.

    Returns:
        ``bool (size, size)`` tensor, or ``bool (H, W)`` when ``size`` is None; True = anomalous pixel.

    Raises:
        ImageReadError: the file is missing, unreadable, corrupt or truncated.
        ValueError: ``size`` is not a positive int or None.
    """
    if size is not None:
        _check_size(size)

    def convert(img: Image.Image) -> Image.Image:
        if size is not None:
            img = img.resize((size, size), Image.Resampling.NEAREST)
        return img if img.mode == "L" else img.convert("L")

    return _decode(path, convert, "mask")[0][0] > 0


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Original ``(H, W)`` of an image file, read from its header (no full decode).

    Raises:
        ImageReadError: the file is missing or not an image.
    """
    try:
        with Image.open(path) as img:
            return img.height, img.width
    except _DECODE_ERRORS as exc:
        raise ImageReadError(f"cannot read image {os.fspath(path)}: {exc}", path) from exc


def device_decodable(paths: Sequence[str | os.PathLike]) -> bool:
    """Whether every file is a JPEG that ``decode_images`` decodes as the CPU path does: 8-bit grey or RGB (grey is
    repeated into RGB by both), not CMYK. Reads headers only; an unreadable file makes it False (the CPU path then
    reports it)."""
    if not paths:
        return False
    try:
        for path in paths:
            with Image.open(path) as img:
                if img.format != "JPEG" or img.mode not in ("L", "RGB"):
                    return False
    except _DECODE_ERRORS:
        return False
    return True


def decode_images(data: Sequence[torch.Tensor], device: torch.device | str,
                  size: int | tuple[int, int] | None = None) -> torch.Tensor:
    """Encoded JPEG files (``ImageDataset(encoded=True)`` items: uint8 ``(n_bytes,)`` on the CPU) -> uint8
    ``(B, 3, H, W)`` RGB on ``device``, in one batched call: nvJPEG on CUDA (the decode runs on the GPU, so the
    loader's CPU workers only read files), libjpeg-turbo on the CPU (the same pixels as PIL's decode).

    Images of one size are returned at that size (the detector resizes the batch on the device, as for
    ``resize=False``); images of different sizes are each resized to ``size`` on the device first, with PIL's
    LANCZOS to its very pixels (``lanczos_resize``), so that they form one batch.

    Raises:
        ValueError: the images differ in size and no ``size`` was given.
        ImageReadError: a file of the batch is not a decodable JPEG.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    try:
        if _decode_jpeg_takes_lists():
            images = decode_jpeg(list(data), mode=ImageReadMode.RGB, device=device)
        else:  # torchvision 0.19: one file per call
            images = [decode_jpeg(item, mode=ImageReadMode.RGB, device=device) for item in data]
    except RuntimeError as exc:
        raise ImageReadError(f"cannot decode a JPEG of this batch on {device}: {exc}; decode on the CPU instead "
                             "(cli.py: --resize cpu)") from exc
    sizes = {tuple(image.shape[-2:]) for image in images}
    if len(sizes) > 1:
        if size is None:
            raise ValueError(f"images of {len(sizes)} sizes need a common size to be resized to; pass size=")
        hw = _check_hw(size)
        images = [lanczos_resize(image, hw) for image in images]
    return torch.stack(images)


@functools.lru_cache(maxsize=None)
def _decode_jpeg_takes_lists() -> bool:
    """Whether ``torchvision.io.decode_jpeg`` decodes a list of files in one call (torchvision >= 0.20)."""
    import torchvision

    major, minor = (int(part) for part in torchvision.__version__.split(".")[:2])
    return (major, minor) >= (0, 20)


def _collate_encoded(items: list[dict[str, torch.Tensor | int]]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """The default collate, except ``"image"``: encoded files differ in length, so they stay a list."""
    batch = default_collate([{k: v for k, v in item.items() if k != "image"} for item in items])
    batch["image"] = [item["image"] for item in items]
    return batch


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _image_files(folder: Path, recursive: bool) -> list[Path]:
    """Image files under an existing ``folder``, sorted by relative path; may be empty. Hidden files are skipped."""
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p.name))
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, f) for f in filenames if _is_image(f))
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        state = "is not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{what} {path} {state}; expected the MVTec AD layout {_LAYOUT}")


def list_images(folder: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Image files in a plain folder, sorted (deterministic); hidden files and folders are skipped.

    Args:
        folder: a folder of images.
        recursive: also list images in subfolders.

    Returns:
        Paths whose suffix is in ``IMAGE_EXTENSIONS`` (any case), sorted by path relative to ``folder``.

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a folder.
        ValueError: ``folder`` holds no image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"image folder {folder} {state}")
    paths = _image_files(folder, recursive)
    if not paths:
        where = "or its subfolders " if recursive else ""
        raise ValueError(
            f"no images in {folder} {where}(looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, any case)"
        )
    return paths


def list_categories(root: str | os.PathLike) -> list[str]:
    """Names of the category folders under an MVTec AD style root: those holding ``train/good``, sorted.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        ValueError: no subfolder of ``root`` holds ``train/good`` (the message says when ``root`` itself is a
            category folder).
    """
    root = Path(root)
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise FileNotFoundError(f"data root {root} {state}; expected the MVTec AD layout {_LAYOUT}")
    names = sorted(d.name for d in root.iterdir() if (d / "train" / "good").is_dir())
    if not names:
        hint = (
            f"; {root} itself looks like a category folder, pass its parent {root.parent} as root"
            if (root / "train" / "good").is_dir()
            else ""
        )
        raise ValueError(f"no category folder under {root}: expected the MVTec AD layout {_LAYOUT}{hint}")
    return names


def _mask_finder(folder: Path) -> Callable[[Path], Path | None]:
    """``relative image path -> mask path or None`` for ``MVTecCategory.from_folders``: the mask at the image's
    relative path (``<sub>/<stem>.*`` or ``<sub>/<stem>_mask.*``), else one directly in ``folder`` with its stem."""
    by_place: dict[tuple[str, str], list[Path]] = {}
    for f in _image_files(folder, recursive=True):
        stem = f.stem[: -len("_mask")] if f.stem.endswith("_mask") else f.stem
        by_place.setdefault((f.relative_to(folder).parent.as_posix(), stem), []).append(f)

    def find(rel: Path) -> Path | None:
        for place in ((rel.parent.as_posix(), rel.stem), (".", rel.stem)):
            found = by_place.get(place, [])
            if len(found) > 1:
                raise ValueError(f"{len(found)} masks in {folder} fit the defective image {rel} ({found[0].name}, "
                                 f"{found[1].name}): keep one")
            if found:
                return found[0]
        return None

    return find


@dataclass(frozen=True)
class TestSample:
    """One test image of a category.

    Attributes:
        path: the image file.
        label: 0 = normal (``test/good``), 1 = anomalous.
        defect: the name of its ``test/`` subfolder (``"good"`` for normal images).
        mask: ``ground_truth/<defect>/<stem>_mask.png``, or None for normal images and when the file is absent.
    """

    __test__ = False  # not a pytest class

    path: Path
    label: int
    defect: str
    mask: Path | None


@dataclass(frozen=True)
class MVTecCategory:
    """The files of one category in the MVTec AD layout, in sorted, deterministic order.

    Build with ``MVTecCategory.load(root, category)``, or from a user's own labelled folders with
    ``MVTecCategory.from_folders(train, normal, abnormal, masks)``.

    Attributes:
        root: the category folder ``<root>/<category>`` (``from_folders``: the folders' common parent); test paths
            are shown relative to its parent (``from_folders``: to itself).
        name: the category name.
        train: normal training images (``train/good``), sorted.
        test: test samples sorted by (defect folder, file name), ``good`` included.
        masks_expected: every defective test image should have a mask (a ``ground_truth`` folder exists, or a mask
            folder was given): those without one are reported and left out of the pixel metrics.
    """

    root: Path
    name: str
    train: tuple[Path, ...]
    test: tuple[TestSample, ...]
    masks_expected: bool = False

    @classmethod
    def load(cls, root: str | os.PathLike, category: str) -> MVTecCategory:
        """Reads the layout of ``<root>/<category>`` (file names only; no image is decoded).

        Args:
            root: the data root holding category folders.
            category: a category folder name, e.g. ``"bottle"``.

        Raises:
            FileNotFoundError: the category, ``train/good`` or ``test`` folder is missing (the message names it).
            ValueError: ``train/good`` or ``test`` holds no image.
        """
        folder = Path(root) / category
        _require_dir(folder, "category folder")
        train_dir = folder / "train" / "good"
        _require_dir(train_dir, "training folder")
        test_dir = folder / "test"
        _require_dir(test_dir, "test folder")

        train = tuple(_image_files(train_dir, recursive=False))
        if not train:
            raise ValueError(f"no training images in {train_dir} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
        test: list[TestSample] = []
        for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
            defect = defect_dir.name
            for path in _image_files(defect_dir, recursive=False):
                mask = None
                if defect != "good":
                    candidate = folder / "ground_truth" / defect / f"{path.stem}_mask.png"
                    mask = candidate if candidate.is_file() else None
                test.append(TestSample(path, 0 if defect == "good" else 1, defect, mask))
        if not test:
            raise ValueError(f"no test images in the subfolders of {test_dir} (expected {test_dir}/<defect>/*)")
        return cls(folder, category, train, tuple(test), masks_expected=(folder / "ground_truth").is_dir())

    @classmethod
    def from_folders(cls, train: str | os.PathLike, normal: str | os.PathLike, abnormal: str | os.PathLike,
                     masks: str | os.PathLike | None = None, name: str = "custom") -> MVTecCategory:
        """A category from a user's own labelled folders, without the MVTec AD layout (no image is decoded).

        Args:
            train: normal training images (searched recursively).
            normal: normal test images (recursively; defect type ``"good"``).
            abnormal: defective test images (recursively); the defect type is an image's subfolder below
                ``abnormal``, or the folder's own name for images directly in it.
            masks: optional folder of masks (0 = normal, > 0 = defect), searched recursively and matched to the
                defective images by file stem: first at the image's own relative path (``<sub>/<stem>.*`` or
                ``<sub>/<stem>_mask.*``), then by stem anywhere in the folder when that stem is unique.
            name: the category name in tables, JSON and reports.

        Raises:
            FileNotFoundError: a folder is missing (the message names which).
            ValueError: a folder holds no image, an image is in both the training and a test folder, or a stem
                matches several masks.
        """
        folders = {"training folder (--train_dir)": train, "normal test folder (--normal_dir)": normal,
                   "defective test folder (--abnormal_dir)": abnormal}
        if masks is not None:
            folders["mask folder (--mask_dir)"] = masks
        folders = {what: Path(os.path.abspath(f)) for what, f in folders.items()}  # one common parent below
        for what, folder in folders.items():
            if not folder.is_dir():
                state = "is not a folder" if folder.exists() else "does not exist"
                raise FileNotFoundError(f"{what} {folder} {state}")
        train_paths, normal_paths, abnormal_paths = (list_images(f) for f in list(folders.values())[:3])
        seen = {os.path.realpath(p) for p in train_paths}
        both = [p for p in normal_paths + abnormal_paths if os.path.realpath(p) in seen]
        if both:
            raise ValueError(f"{len(both)} test images are also training images (e.g. {both[0]}): the training folder "
                             "must hold other images than the test folders, or the scores mean nothing")
        abnormal = folders["defective test folder (--abnormal_dir)"]
        find = _mask_finder(folders["mask folder (--mask_dir)"]) if masks is not None else None
        test = [TestSample(p, 0, "good", None) for p in normal_paths]
        for p in abnormal_paths:
            rel = p.relative_to(abnormal)
            defect = rel.parent.as_posix() if rel.parent != Path(".") else abnormal.resolve().name
            test.append(TestSample(p, 1, defect, find(rel) if find is not None else None))
        claimed: dict[Path, Path] = {}
        for sample in test:
            if sample.mask is not None and claimed.setdefault(sample.mask, sample.path) != sample.path:
                raise ValueError(f"the mask {sample.mask} fits two defective images ({claimed[sample.mask]}, "
                                 f"{sample.path}): put each mask at its image's path relative to the defective "
                                 "folder, e.g. <defect>/<stem>_mask.png")
        root = Path(os.path.commonpath(list(folders.values())))
        return cls(root, name, tuple(train_paths), tuple(test), masks_expected=masks is not None)

    @property
    def test_paths(self) -> list[Path]:
        """Test image paths, in ``test`` order."""
        return [s.path for s in self.test]

    @property
    def test_labels(self) -> torch.Tensor:
        """``int64 (M,)`` test labels, 0 = normal, 1 = anomalous."""
        return torch.tensor([s.label for s in self.test], dtype=torch.int64)

    @property
    def defect_types(self) -> list[str]:
        """Defect folder name of each test image (``"good"`` for normal ones)."""
        return [s.defect for s in self.test]

    @property
    def mask_paths(self) -> list[Path | None]:
        """Mask path of each test image, None for normal images and missing masks."""
        return [s.mask for s in self.test]


class ImageDataset(Dataset):
    """Decodes image files to ``uint8`` tensors of one size.

    Items are dicts (the default collate stacks them into a batch):
        - ``"image"``: ``uint8 (3, H, W)`` of ``size``;
        - ``"index"``: ``int``, the position in ``paths``;
        - ``"orig_size"``: ``int64 (2,)``, the file's own ``(H, W)``;
        - ``"label"``: ``int``, only when ``labels`` were given;
        - ``"ok"``: ``bool`` and ``"error"``: ``str``, only with ``skip_unreadable``: False and the reason for a file
          that cannot be read, whose ``"image"`` is then zeros and ``"orig_size"`` ``(0, 0)``.

    Args:
        paths: image files.
        size: side of the square images, or ``(height, width)``, pixels.
        labels: optional per-image labels, same length as ``paths``.
        cache: an optional ``PreprocessCache`` (or its folder): decoded, resized images are kept on disk, keyed by
            file content and settings, and reused by later runs.
        resize: True = LANCZOS to ``size`` here (the reference); False = deliver each image at its own size, to be
            resized on the device after transfer (``FREDetector.features``: the same LANCZOS, ``lanczos_resize``).
            Batches then need images of one size, and ``cache`` is not used (it stores resized images).
        skip_unreadable: an unreadable file gives an item with ``ok=False`` and its error instead of raising
            ``ImageReadError``, so one bad file does not stop a run (the consumer drops those rows).
        encoded: with ``resize=False``, deliver each file's bytes undecoded (``"image"``: uint8 ``(n_bytes,)``;
            batches keep them in a list, see ``collate_fn``), for ``decode_images`` on the device: JPEGs only
            (``device_decodable``). The workers then only read files.

    Attributes:
        collate_fn: the DataLoader collate function its items need (``make_loader`` passes it): None (the default
            collate) unless ``encoded``.

    Raises:
        ValueError: ``size`` is not a positive int (or pair), ``labels`` has the wrong length, ``skip_unreadable`` is
            combined with ``resize=False`` (a stand-in for an unreadable image needs the common size), or
            ``encoded`` without ``resize=False``.
    """

    def __init__(
        self, paths: Sequence[str | os.PathLike], size: int | tuple[int, int], labels: Sequence[int] | torch.Tensor | None = None,
        cache: PreprocessCache | str | os.PathLike | None = None, resize: bool = True, skip_unreadable: bool = False,
        encoded: bool = False,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.size = size if isinstance(size, int) else _check_hw(size)
        self.hw = _check_hw(size)
        self.resize = bool(resize)
        self.skip_unreadable = bool(skip_unreadable)
        self.encoded = bool(encoded)
        if self.skip_unreadable and not self.resize:
            raise ValueError("skip_unreadable needs resize=True: an unreadable image is replaced by zeros of the "
                             "common size")
        if self.encoded and self.resize:
            raise ValueError("encoded=True needs resize=False: undecoded files are resized after decoding, on the "
                             "device")
        self.collate_fn = _collate_encoded if self.encoded else None
        self.cache = cache if cache is None or isinstance(cache, PreprocessCache) else PreprocessCache(cache)
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
            if labels.numel() != len(self.paths):
                raise ValueError(f"got {labels.numel()} labels for {len(self.paths)} images; pass one per image")
        self.labels = labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int | bool | str]:
        if not self.skip_unreadable:
            return self._item(index)
        try:
            return {**self._item(index), "ok": True, "error": ""}
        except ImageReadError as err:
            item = {"image": torch.zeros(3, *self.hw, dtype=torch.uint8), "index": index,
                    "orig_size": torch.zeros(2, dtype=torch.int64), "ok": False, "error": str(err)}
            if self.labels is not None:
                item["label"] = int(self.labels[index])
            return item

    def _item(self, index: int) -> dict[str, torch.Tensor | int]:
        path = self.paths[index]
        if self.encoded:
            height, width = image_size(path)
            try:
                image = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
            except OSError as exc:
                raise ImageReadError(f"cannot read image {path}: {exc}", path) from exc
        elif not self.resize:
            image, (height, width) = _decode(path, _to_rgb)
        elif self.cache is None:
            image, (height, width) = _read_image(path, self.size)
        else:
            image, (height, width) = self.cache.read(path, self.size)
        item: dict[str, torch.Tensor | int] = {
            "image": image,
            "index": index,
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
        if self.labels is not None:
            item["label"] = int(self.labels[index])
        return item


class _Loader(DataLoader):
    """A DataLoader that stops its worker processes as soon as iteration fails.

    Otherwise the failed iterator is only freed by the cyclic garbage collector (the re-raised exception's traceback
    refers to it), which closes its queues before running its destructor, so each worker waits out its join
    timeout (5 s) at some later, random point.
    """

    def __iter__(self):  # type: ignore[override]
        iterator = super().__iter__()
        try:
            yield from iterator
        except Exception:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if callable(shutdown):
                shutdown()
            self._iterator = None  # a persistent iterator is dead now: the next epoch starts a new one
            raise


def cpu_count() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


SMALL_CPU_CORES = 4
"""Up to this many cores, a loader feeding the CPU decodes in the main process by default. The backbone's threads
already use every core there; decoding processes beside them take cores away at random moments, and each parallel
region of the backbone then waits for its slowest thread. On the 2-core VM of BENCHMARKS.md, ``evaluate`` with no
workers took 3-12 % less time than with 2 (bottle, screw, magnetic_tile; identical figures). Larger machines keep
workers: there, decoding in one process would become the bottleneck."""


def make_loader(
    dataset: Dataset,
    batch_size: int,
    device: torch.device | str,
    num_workers: int | None = None,
    shuffle: bool = False,
) -> DataLoader:
    """A DataLoader that decodes images in worker processes.

    Args:
        dataset: e.g. an ``ImageDataset``.
        batch_size: images per batch.
        device: where batches will go; memory is pinned when it is CUDA.
        num_workers: worker processes; None = ``min(4, available CPUs, number of batches)``, and 0 (decode in the
            main process) when the dataset fits in one batch or when the batches go to the CPU of a machine with
            at most ``SMALL_CPU_CORES`` cores (see there).
        shuffle: reshuffle every epoch (off for feature extraction, which must be deterministic).

    Returns:
        A DataLoader keeping its workers alive between epochs (``persistent_workers``) when it has any.
        An ``ImageReadError`` raised in a worker reaches the caller as ``ImageReadError`` naming the file.

    Raises:
        ValueError: ``batch_size`` is not a positive int or ``num_workers`` is negative.
    """
    _check_size(batch_size, "batch_size")
    device = torch.device(device)
    if num_workers is None:
        n_batches = math.ceil(len(dataset) / batch_size)
        small_cpu = device.type == "cpu" and cpu_count() <= SMALL_CPU_CORES
        num_workers = 0 if n_batches <= 1 or small_cpu else min(4, cpu_count(), n_batches)
    elif num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 = load in the main process), got {num_workers}")
    return _Loader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        collate_fn=getattr(dataset, "collate_fn", None),
    )
