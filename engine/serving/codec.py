"""Request and reply bodies of `python -m engine.serve`: .npy / .npz arrays, PNG grids, JSON.

Bodies are read with a byte limit enforced while reading (an over-size body is refused with
413 before it is buffered). Arrays are parsed without ever unpickling: `np.load(...,
allow_pickle=False)`, and object / structured dtypes are refused. Every refusal is a
`RequestError` carrying its HTTP status and a one-line message that says what was expected.

    application/x-npy   one array (numpy.save)
    application/x-npz   named arrays (numpy.savez / savez_compressed); each member is capped
                        at the body limit after decompression, so a zip bomb is refused
    image/png           a grid of images (B, C, H, W), C in {1, 3}, 2 px padding
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from typing import Any

import numpy as np
from numpy.lib import format as npformat
from PIL import Image
from starlette.requests import Request

NPY, NPZ, PNG, JSON = "application/x-npy", "application/x-npz", "image/png", "application/json"
NPY_MAGIC, ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"
HEADER_READERS = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}


class RequestError(Exception):
    """A request the server refuses: HTTP status, one-line message, extra headers."""

    def __init__(self, message: str, status: int = 400, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


# --- reading ---------------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` bytes (declared or read)."""
    declared = request.headers.get("content-length")
    too_big = f"the body is larger than the server's limit of {limit} bytes (--max-body-mb);" \
              " send fewer rows per request"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(too_big, 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(too_big, 413)
    return bytes(body)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def parse_arrays(body: bytes, content_type: str, limit: int, default_name: str
                 ) -> dict[str, np.ndarray]:
    """name -> array of an .npy (named `default_name`) or .npz body; the magic bytes decide
    when the content type is absent or application/octet-stream."""
    if content_type in ("", "application/octet-stream"):
        content_type = NPZ if body.startswith(ZIP_MAGIC) else NPY
    if content_type == NPY:
        return {default_name: parse_npy(body, "the body")}
    if content_type == NPZ:
        return parse_npz(body, limit)
    raise RequestError(f"expected Content-Type {NPY} (one array) or {NPZ} (named arrays), got"
                       f" {content_type!r}", 415)


def parse_npy(data: bytes, what: str) -> np.ndarray:
    """An .npy payload -> a C-ordered array (read-only when it views `data`).

    The header is read once, by numpy's own reader (a literal parse, never an unpickle), and
    checked before any data is touched: a plain numeric dtype (object and structured dtypes
    are refused, so nothing can unpickle) and a shape whose size matches the bytes sent (a
    lying header allocates nothing). The data is then viewed in place with np.frombuffer:
    what np.load(allow_pickle=False) does for such a dtype, without parsing the header twice.
    """
    if not data.startswith(NPY_MAGIC):
        raise RequestError(f"{what} is not an .npy file (it should start with b'\\x93NUMPY', as"
                           " numpy.save writes); send numpy.save(buffer, array) bytes")
    stream = io.BytesIO(data)
    try:
        version = npformat.read_magic(stream)
        read_header = HEADER_READERS.get(version)
        if read_header is None:
            raise ValueError(f"format version {version}; expected 1.0 or 2.0")
        shape, fortran, dtype = read_header(stream)
    except ValueError as e:  # bad magic, unparsable header or dtype
        raise RequestError(f"{what} has an unreadable .npy header: {e}") from e
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise RequestError(f"{what} has dtype {dtype}; expected a plain numeric dtype (float32"
                           " latents and images, integer labels and codes, bool masks)")
    count, offset = math.prod(shape), stream.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise RequestError(f"{what}: its header says {shape} {dtype} ({count * dtype.itemsize}"
                           f" bytes of data), but {len(data) - offset} bytes follow; the file is"
                           " truncated or padded")
    array = np.frombuffer(data, dtype, count, offset)
    if fortran:
        return np.ascontiguousarray(array.reshape(shape[::-1]).T)
    return array.reshape(shape)


def parse_npz(data: bytes, limit: int) -> dict[str, np.ndarray]:
    """An .npz payload -> name -> array; each member decompressed to at most `limit` bytes."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise RequestError(f"the body is not a readable .npz archive: {e}") from e
    arrays: dict[str, np.ndarray] = {}
    total = 0
    for info in members:
        name = info.filename.removesuffix(".npy")
        if not info.filename.endswith(".npy") or name in arrays:
            raise RequestError(f"the .npz holds {info.filename!r}; expected one NAME.npy per"
                               " array, as numpy.savez(buffer, NAME=array) writes")
        try:
            with archive.open(info) as f:
                raw = f.read(limit - total + 1)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
            raise RequestError(f"the .npz member {info.filename!r} is corrupt: {e}") from e
        total += len(raw)
        if total > limit:
            raise RequestError(f"the .npz decompresses past the server's limit of {limit} bytes"
                               " (--max-body-mb); send fewer rows per request", 413)
        arrays[name] = parse_npy(raw, f"the .npz member {info.filename!r}")
    if not arrays:
        raise RequestError("the .npz archive is empty; expected the latent and any other inputs"
                           " by name")
    return arrays


def parse_json(body: bytes, fields: dict[str, str]) -> dict[str, Any]:
    """A JSON object whose keys are among `fields` (name -> description for the message)."""
    expected = ", ".join(f"{k!r}: {v}" for k, v in fields.items())
    try:
        data = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON ({e}); expected an object with"
                           f" {expected}") from e
    if not isinstance(data, dict):
        raise RequestError(f"expected a JSON object with {expected}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}; expected {expected}")
    return data


def parse_int_list(text: str, what: str) -> list[int]:
    """'3' -> [3]; '0,1,2' -> [0, 1, 2]."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError as e:
        raise RequestError(f"{what} must be an integer or comma-separated integers, got"
                           f" {text!r}") from e


def json_int(data: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    """data[key] as an int in [lo, hi] (bools refused), or `default` when absent / null."""
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise RequestError(f"{key!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


# --- writing ---------------------------------------------------------------------------------
def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def png_grid(images: np.ndarray, value_range: tuple[float, float] = (0.0, 1.0),
             nrow: int | None = None, pad: int = 2) -> bytes:
    """images (B, C, H, W), C in {1, 3}, values in `value_range` -> PNG bytes of a grid with
    `nrow` images per row (default ceil(sqrt(B))) and `pad` px of black between them."""
    b, c, h, w = images.shape
    lo, hi = value_range
    pixels = np.clip((images.astype(np.float32) - lo) * (255.0 / (hi - lo)) + 0.5, 0, 255)
    pixels = pixels.astype(np.uint8).transpose(0, 2, 3, 1)  # (B, H, W, C)
    cols = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = np.zeros((pad + rows * (h + pad), pad + cols * (w + pad), c), np.uint8)
    for i in range(b):
        r, k = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + k * (w + pad)
        grid[y:y + h, x:x + w] = pixels[i]
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(buf, format="PNG")
    return buf.getvalue()


def accepts(request: Request, media: str) -> bool:
    """Whether the Accept header names `media` (wildcards do not count: the default wins)."""
    return any(part.split(";")[0].strip().lower() == media
               for part in request.headers.get("accept", "").split(","))
