"""engine.serving.codec without HTTP: .npy parsing against numpy's own writer (every dtype and
layout numpy.save produces for plain numbers), .npz limits, PNG grids against a pixel loop."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image

from engine.serving.codec import RequestError, parse_npy, parse_npz, png_grid


def _saved(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize("dtype", ["float32", "float64", "int64", "uint8", "bool", ">f4"])
@pytest.mark.parametrize("order", ["C", "F"])
def test_parse_npy_reads_what_numpy_writes(dtype, order):
    rng = np.random.default_rng(random.randrange(2**31))
    array = np.asarray(rng.standard_normal((3, 4, 5)) * 10, dtype=dtype, order=order)
    got = parse_npy(_saved(array), "x")
    assert got.dtype == array.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got, array)


def test_parse_npy_reads_a_version_2_header():
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, version=(2, 0))
    np.testing.assert_array_equal(parse_npy(buf.getvalue(), "x"), array)


@pytest.mark.parametrize("body,words", [
    (b"\x93NUMPY\x09\x00", "unreadable .npy header"),
    (_saved(np.zeros(3, dtype=[("a", "f4"), ("b", "i4")])), "plain numeric dtype"),
    (_saved(np.array(["ab", "c"])), "dtype <U2"),
    (_saved(np.zeros(3, np.complex64)), "dtype complex64"),
    (_saved(np.zeros((2, 2), np.float32)) + b"\0" * 4, "truncated or padded"),
])
def test_parse_npy_refusals(body, words):
    with pytest.raises(RequestError) as e:
        parse_npy(body, "the body")
    assert words in str(e.value) and e.value.status == 400


def test_parse_npz_rejects_duplicates_and_non_npy_members():
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("notes.txt", b"hello")
    with pytest.raises(RequestError, match="NAME.npy"):
        parse_npz(buf.getvalue(), 1 << 20)
    buf = io.BytesIO()
    np.savez_compressed(buf, z=np.ones((2, 3), np.float32), labels=np.arange(2))
    arrays = parse_npz(buf.getvalue(), 1 << 20)
    assert sorted(arrays) == ["labels", "z"] and arrays["z"].sum() == 6


@pytest.mark.parametrize("channels,value_range", [(1, (0.0, 1.0)), (3, (-1.0, 1.0))])
def test_png_grid_against_a_pixel_loop(channels, value_range):
    rng = np.random.default_rng(random.randrange(2**31))
    b, h, w, pad, nrow = 5, 4, 6, 2, 3
    lo, hi = value_range
    images = rng.uniform(lo - 0.2, hi + 0.2, (b, channels, h, w)).astype(np.float32)
    got = np.asarray(Image.open(io.BytesIO(png_grid(images, value_range, nrow, pad))))
    rows = -(-b // nrow)
    assert got.shape[:2] == (pad + rows * (h + pad), pad + nrow * (w + pad))
    for i in range(b):
        y0, x0 = pad + (i // nrow) * (h + pad), pad + (i % nrow) * (w + pad)
        for c in range(channels):
            for y in range(h):
                for x in range(w):
                    v = (float(images[i, c, y, x]) - lo) / (hi - lo)
                    want = min(255, max(0, int(v * 255 + 0.5)))
                    pixel = got[y0 + y, x0 + x] if channels == 1 else got[y0 + y, x0 + x, c]
                    assert abs(int(pixel) - want) <= 1
    assert got[0].max() == 0  # the padding is black
