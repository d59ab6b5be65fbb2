"""Ground-truth boxes for the pointing game from a JSON file, in each image's own pixels.

The file maps an image (its file name, or the path as given on the command line) to a list of
``[x_min, y_min, x_max, y_max]`` boxes, inclusive and 0-based, in the pixel grid of the image as
displayed (after its EXIF orientation), e.g. ``{"cat.jpg": [[10, 20, 200, 180]]}``. The boxes are
carried through the same centre crop and resize that turned the file into the model input
(:class:`engine.images.ImageRecord`), so they land on the map's grid: a box partly outside the crop
is clipped to it, one wholly outside becomes empty (a miss, as the pointing game scores it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import InputError
from .modelfile import regular_file

MAX_BOXES_FILE_BYTES = 64 * 1024 * 1024  # a data set's worth of boxes; beyond it, a mistake


def read_boxes_file(path: str | Path) -> dict[str, list[list[float]]]:
    """The JSON object of a boxes file, checked: names to lists of four finite numbers, max ≥ min."""
    path = Path(path)
    size = regular_file(path, "boxes file", InputError).st_size
    if size > MAX_BOXES_FILE_BYTES:
        raise InputError(f"{path}: {size} bytes exceeds the {MAX_BOXES_FILE_BYTES}-byte boxes-file limit")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: not a JSON boxes file ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object mapping image names to lists of boxes")
    out: dict[str, list[list[float]]] = {}
    for name, boxes in data.items():
        if not isinstance(boxes, list):
            raise InputError(f"{path}: {name!r}: expected a list of [x_min, y_min, x_max, y_max] boxes")
        checked = []
        for b in boxes:
            ok = isinstance(b, list) and len(b) == 4
            ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in b)
            ok = ok and all(math.isfinite(v) for v in b) and b[2] >= b[0] and b[3] >= b[1]
            if not ok:
                raise InputError(
                    f"{path}: {name!r}: box {b!r} is not [x_min, y_min, x_max, y_max] with max >= min"
                )
            checked.append([float(v) for v in b])
        out[name] = checked
    return out


def box_to_input(box: Sequence[float], crop: Sequence[float], resized_to: Sequence[int]) -> list[int] | None:
    """One inclusive box in source pixels -> inclusive box on the model input's grid, or None.

    Pixel i of the source covers [i, i + 1); the crop (left, top, right, bottom) maps onto the
    input's width × height linearly, as the resize does.
    """
    left, top, right, bottom = (float(v) for v in crop)
    w, h = int(resized_to[0]), int(resized_to[1])
    sx, sy = w / (right - left), h / (bottom - top)
    x0, y0 = (box[0] - left) * sx, (box[1] - top) * sy
    x1, y1 = (box[2] + 1 - left) * sx, (box[3] + 1 - top) * sy  # exclusive edges
    c0, r0 = max(math.floor(x0), 0), max(math.floor(y0), 0)
    c1, r1 = min(math.ceil(x1), w) - 1, min(math.ceil(y1), h) - 1
    if c1 < c0 or r1 < r0:
        return None
    return [c0, r0, c1, r1]


def boxes_for_images(
    boxes: Mapping[str, Sequence[Sequence[float]]], images: Sequence[Mapping[str, Any]], where: str
) -> list[list[list[int]]]:
    """Per image record (``{"path", "decoded": {"crop", "resized_to"}}``) its boxes on the input grid.

    An image is looked up by the path as given, then by its file name; one that has no entry is an
    error naming it (a silent miss would bias the accuracy).
    """
    rows = []
    for rec in images:
        p = str(rec.get("path", ""))
        key = p if p in boxes else Path(p).name
        if key not in boxes:
            raise InputError(f"{where}: no boxes for image {p!r} (keys are file names or paths as given)")
        dec = rec.get("decoded") or {}
        if "crop" not in dec or "resized_to" not in dec:
            raise InputError(f"{where}: image {p!r} has no crop/resize record to place its boxes")
        placed = [box_to_input(b, dec["crop"], dec["resized_to"]) for b in boxes[key]]
        rows.append([b for b in placed if b is not None])
    return rows
