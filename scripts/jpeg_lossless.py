"""A JPEG Lossless encoder (ITU T.81 process 14, first-order prediction, SV1) for grey images.

pydicom ships no encoder for transfer syntax 1.2.840.10008.1.2.4.70, yet it is what many
modalities send, so the synthetic corpus encodes it here. The output is checked against
an independent decoder (pylibjpeg-libjpeg) in the tests.
"""

from __future__ import annotations

import struct

import numpy as np
from numpy.typing import NDArray

# A fixed Huffman table for difference categories 0..16: T.81 Table K.3 (categories 0-11)
# extended by one code each of lengths 10-14 for categories 12-16.
_BITS = [0, 1, 5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]  # codes of length 1..16
_CATEGORIES = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]


def _code_table() -> tuple[NDArray[np.uint32], NDArray[np.uint8]]:
    """Canonical Huffman codes (T.81 Annex C) for the table above."""
    codes = np.zeros(17, dtype=np.uint32)
    lengths = np.zeros(17, dtype=np.uint8)
    code = 0
    k = 0
    for length, count in enumerate(_BITS, start=1):
        for _ in range(count):
            codes[_CATEGORIES[k]] = code
            lengths[_CATEGORIES[k]] = length
            code += 1
            k += 1
        code <<= 1
    return codes, lengths


def _predict(image: NDArray[np.integer], precision: int) -> NDArray[np.int64]:
    """Differences from predictor 1 (left), with T.81 H.1.2.1 rules for row/column starts."""
    x = image.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diff = (x - pred) & 0xFFFF
    return np.where(diff >= 0x8000, diff - 0x10000, diff)


def _entropy_code(diff: NDArray[np.int64]) -> bytes:
    codes, lengths = _code_table()
    flat = diff.ravel()
    magnitude = np.abs(flat)
    ssss = np.zeros(flat.shape, dtype=np.int64)
    nonzero = magnitude > 0
    ssss[nonzero] = np.floor(np.log2(magnitude[nonzero])).astype(np.int64) + 1
    ssss[flat == -32768] = 16
    extra = np.where(flat < 0, flat - 1, flat) & ((1 << ssss) - 1)
    extra = np.where(ssss == 16, 0, extra)
    extra_len = np.where(ssss == 16, 0, ssss)
    value = (codes[ssss].astype(np.int64) << extra_len) | extra
    total = lengths[ssss].astype(np.int64) + extra_len
    # Lay each variable-length code out as bits, most significant first.
    shifts = np.arange(31, -1, -1, dtype=np.int64)
    bits = ((value[:, None] >> shifts) & 1).astype(np.uint8)
    keep = shifts[None, :] < total[:, None]
    stream = bits[keep]
    pad = (-stream.size) % 8
    stream = np.concatenate([stream, np.ones(pad, dtype=np.uint8)])
    data = np.packbits(stream).tobytes()
    return data.replace(b"\xff", b"\xff\x00")


def encode_jpeg_lossless(image: NDArray[np.integer], precision: int) -> bytes:
    """One grey frame (rows x columns, unsigned, ``precision`` bits) as a JPEG bit stream."""
    if image.ndim != 2:
        raise ValueError("only single-component frames are supported")
    rows, columns = image.shape
    out = bytearray(b"\xff\xd8")
    # SOF3: lossless, Huffman
    sof = struct.pack(">BHHB", precision, rows, columns, 1) + bytes([1, 0x11, 0])
    out += b"\xff\xc3" + struct.pack(">H", len(sof) + 2) + sof
    dht = bytes([0x00]) + bytes(_BITS) + bytes(_CATEGORIES)
    out += b"\xff\xc4" + struct.pack(">H", len(dht) + 2) + dht
    # SOS: one component, table 0, Ss = predictor 1, Se = 0, Ah/Al = 0
    sos = bytes([1, 1, 0x00, 1, 0, 0])
    out += b"\xff\xda" + struct.pack(">H", len(sos) + 2) + sos
    out += _entropy_code(_predict(image, precision))
    out += b"\xff\xd9"
    return bytes(out)
