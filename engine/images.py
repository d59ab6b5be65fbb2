"""Image files -> model input: decode, orient, resize (shorter side), centre-crop, scale, layout.

Every image file is untrusted input. Before any pixel is decoded the file must be a regular file
(a named pipe would block forever) and its header size within ``ONNXPLAIN_MAX_IMAGE_PIXELS``;
the resize works on the source region that the crop keeps, so an extreme aspect ratio (a
4,000,000×1 PNG) never makes a huge intermediate image. Samples are scaled by their own bit
depth (a 16-bit PNG by 65,535, not clipped to 255), EXIF orientation is applied, and each image
gets a record of how it was decoded, resized and cropped (`ImageRecord`), which results keep.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError, InputError
from .modelfile import regular_file
from .providers import env_int

DEFAULT_MAX_PIXELS = 100_000_000  # a 10,000 × 10,000 photo; Pillow's own bomb limit is 89M/179M
MAX_PIXELS_VAR = "ONNXPLAIN_MAX_IMAGE_PIXELS"
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


@dataclass(frozen=True)
class ImageRecord:
    """How one file became one model input (kept in result records, so a map can be reproduced)."""

    path: str
    format: str | None
    mode: str  # Pillow's mode of the decoded file ("RGB", "I;16", "P", ...)
    size: tuple[int, int]  # (width, height) as stored
    orientation: int  # EXIF orientation tag applied (1: none)
    scale: str  # how samples became [0, 1]: "/255", "/65535", "float"
    converted: str  # colour conversion, e.g. "RGBA->RGB (alpha dropped)", "none"
    crop: tuple[float, float, float, float]  # source box (left, top, right, bottom) after orientation
    resized_to: tuple[int, int]  # (width, height) fed to the model

    def to_dict(self) -> dict:
        return asdict(self)


def load_images(
    paths, input_shape: tuple[int, ...], layout: str | None, input_range: tuple[float, float] = (0.0, 1.0)
) -> np.ndarray:
    """A float32 batch shaped (N, *input_shape) from image files, scaled to ``input_range``."""
    return read_images(paths, input_shape, layout, input_range)[0]


def read_images(
    paths, input_shape: tuple[int, ...], layout: str | None, input_range: tuple[float, float] = (0.0, 1.0)
) -> tuple[np.ndarray, list[ImageRecord]]:
    """The batch of :func:`load_images` and one :class:`ImageRecord` per file."""
    return _batch([_Source(Path(p), str(Path(p))) for p in paths], input_shape, layout, input_range)


def read_image_bytes(
    blobs,
    names,
    input_shape: tuple[int, ...],
    layout: str | None,
    input_range: tuple[float, float] = (0.0, 1.0),
) -> tuple[np.ndarray, list[ImageRecord]]:
    """:func:`read_images` for encoded image files already in memory (the ``bytes`` column of
    ``ray.data.read_binary_files``): the same decoder with the same pixel limit, bit depths, EXIF
    orientation and errors. ``names`` (the files' paths) take the paths' place in error messages
    and records, so a file read either way gives the same message and the same record."""
    blobs, names = list(blobs), [str(n) for n in names]
    if len(blobs) != len(names):
        raise InputError(f"{len(blobs)} encoded images but {len(names)} names")
    return _batch(
        [_Source(_NamedBytes(b, n), n) for b, n in zip(blobs, names)], input_shape, layout, input_range
    )


class _NamedBytes(io.BytesIO):
    """Bytes that Pillow names like the file they came from: its "cannot identify image file %r"
    shows the object's repr, which for a path is the quoted path."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self._name = name

    def __repr__(self) -> str:
        return repr(self._name)


@dataclass(frozen=True)
class _Source:
    source: Path | _NamedBytes  # what Pillow opens
    name: str  # what messages and records call it


def _batch(sources: list[_Source], input_shape, layout, input_range) -> tuple[np.ndarray, list[ImageRecord]]:
    if layout not in ("NCHW", "NHWC"):
        raise InputError(f"the model's layout is {layout!r}; image files need an NCHW or NHWC image model")
    c, h, w = input_shape if layout == "NCHW" else (input_shape[2], input_shape[0], input_shape[1])
    if c not in (1, 3):
        raise InputError(f"the model takes {c} channels; image files give 1 (grayscale) or 3 (RGB)")
    limit = env_int(MAX_PIXELS_VAR, DEFAULT_MAX_PIXELS, minimum=1)
    batch, records = [], []
    for s in sources:
        if isinstance(s.source, Path):
            regular_file(s.source, "image file", ImageError)
        arr, record = _read_one(s.source, s.name, c, h, w, limit)
        batch.append(arr.transpose(2, 0, 1) if layout == "NCHW" else arr)
        records.append(record)
    if not batch:
        raise InputError("no image files given")
    lo, hi = input_range
    return (np.stack(batch) * (hi - lo) + lo).astype(np.float32), records


def _read_one(source, path: str, c: int, h: int, w: int, limit: int) -> tuple[np.ndarray, ImageRecord]:
    try:
        with Image.open(source) as img:
            width, height = img.size
            if width * height > limit:  # the header is read, no pixel decoded yet
                raise ImageError(
                    f"{path}: {width}×{height} = {width * height} pixels exceeds the limit of {limit} "
                    f"({MAX_PIXELS_VAR})"
                )
            fmt, mode = img.format, img.mode
            orientation = int(img.getexif().get(0x0112, 1) or 1)
            img.load()
            img = ImageOps.exif_transpose(img)
            planes, scale, converted = _planes(img, c, path)
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot read image ({e})") from e
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as e:  # truncated or corrupt data
        raise ImageError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from e
    box = _crop_box(planes[0].width, planes[0].height, h, w)
    out = np.stack([np.asarray(q.resize((w, h), Image.BILINEAR, box=box), np.float32) for q in planes], -1)
    if scale == "/255":
        out = out / 255.0
    if scale == "float" and not (np.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0):
        raise ImageError(f"{path}: floating-point samples must lie in [0, 1]")
    record = ImageRecord(str(path), fmt, mode, (width, height), orientation, scale, converted, box, (w, h))
    return out.astype(np.float32), record


def _planes(img: Image.Image, c: int, name: str) -> tuple[list[Image.Image], str, str]:
    """The image as ``c`` single-band planes Pillow can resize, how samples scale, and the conversion.

    8-bit data stays uint8 through the resize (bit-identical to resizing an RGB image); 16-bit and
    32-bit integer data become float planes already divided by 65,535, never clipped to 8 bits.
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        a = np.asarray(img, dtype=np.float64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise ImageError(f"{name}: {mode} samples outside the 16-bit range")
        plane = Image.fromarray((a / 65535.0).astype(np.float32), mode="F")
        return [plane] * c, "/65535", "gray->RGB (replicated)" if c == 3 else "none"
    if mode == "F":
        return [img] * c, "float", "gray->RGB (replicated)" if c == 3 else "none"
    target = "RGB" if c == 3 else "L"
    converted = "none"
    if mode != target:
        dropped = " (alpha dropped)" if "A" in mode or "transparency" in img.info else ""
        converted = f"{mode}->{target}{dropped}"
        img = img.convert(target)
    return list(img.split()), "/255", converted


def _crop_box(width: int, height: int, h: int, w: int) -> tuple[float, float, float, float]:
    """The source region that scaling the shorter side to the model and centre-cropping keeps."""
    scale = max(h / height, w / width)
    # Same arithmetic as resizing the whole image to round(side*scale) and cropping its centre.
    rw, rh = max(w, round(width * scale)), max(h, round(height * scale))
    left, top = (rw - w) // 2, (rh - h) // 2
    sx, sy = width / rw, height / rh
    return (left * sx, top * sy, (left + w) * sx, (top + h) * sy)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


def expand_paths(items) -> list[Path]:
    """Image files from files, folders (their image files, sorted, not recursive) and globs.

    Only what the user named is read: a folder contributes the files in it with an image suffix;
    a glob pattern (``*``, ``?``, ``[``) contributes its sorted matches. Duplicates are kept once.
    """
    import glob

    found: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()))
        elif not p.exists() and any(c in str(item) for c in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(item)))
            if not matches:
                raise ImageError(f"{item}: no file matches this pattern")
            found.extend(m for m in matches if not m.is_dir())
        else:
            found.append(p)
    seen, unique = set(), []
    for p in found:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    if not unique:
        raise ImageError(f"no image files in {', '.join(map(str, items))}")
    return unique
