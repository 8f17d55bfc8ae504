#!/usr/bin/env python3
"""Export Fashion-MNIST IDX files to an ImageFolder tree of grayscale PNGs.

Usage: fashion-mnist-export.py SRC_DIR OUT_DIR

SRC_DIR holds the four IDX files of Debian's `dataset-fashion-mnist`
(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...). OUT_DIR gets
`train/<class>/NNNNN.png` (60,000) and `val/<class>/NNNNN.png` (the 10,000 test
images), NNNNN being the image's index in its IDX file. Class folders are
prefixed by the official label id so that sorting folder names (which is how
megalodon-vision's ImageFolder assigns label ids) gives back the official ids.

Standard library only: the PNGs are written by hand (8-bit grayscale, filter 0).
"""

import gzip
import os
import struct
import sys
import zlib

CLASSES = [
    "0-t-shirt-top",
    "1-trouser",
    "2-pullover",
    "3-dress",
    "4-coat",
    "5-sandal",
    "6-shirt",
    "7-sneaker",
    "8-bag",
    "9-ankle-boot",
]


def read_idx(path, want_magic):
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        sys.exit(f"{path}: too short for an IDX header")
    magic, count = struct.unpack(">II", data[:8])
    if magic != want_magic:
        sys.exit(f"{path}: magic {magic:#x}, expected {want_magic:#x}")
    if want_magic == 0x803:  # images: count, rows, cols
        rows, cols = struct.unpack(">II", data[8:16])
        body = data[16:]
        if len(body) != count * rows * cols:
            sys.exit(f"{path}: {len(body)} pixel bytes, expected {count}*{rows}*{cols}")
        return count, rows, cols, body
    body = data[8:]
    if len(body) != count:
        sys.exit(f"{path}: {len(body)} labels, expected {count}")
    return count, body


def png_chunk(kind, payload):
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def gray_png(pixels, rows, cols):
    raw = b"".join(b"\x00" + pixels[r * cols:(r + 1) * cols] for r in range(rows))
    ihdr = struct.pack(">IIBBBBB", cols, rows, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b""))


def export(src, out, prefix, split):
    n, rows, cols, pixels = read_idx(os.path.join(src, f"{prefix}-images-idx3-ubyte.gz"), 0x803)
    m, labels = read_idx(os.path.join(src, f"{prefix}-labels-idx1-ubyte.gz"), 0x801)
    if n != m:
        sys.exit(f"{prefix}: {n} images but {m} labels")
    for name in CLASSES:
        os.makedirs(os.path.join(out, split, name), exist_ok=True)
    size = rows * cols
    for i in range(n):
        label = labels[i]
        if label >= len(CLASSES):
            sys.exit(f"{prefix}: label {label} at index {i} is out of range")
        path = os.path.join(out, split, CLASSES[label], f"{i:05d}.png")
        with open(path, "wb") as f:
            f.write(gray_png(pixels[i * size:(i + 1) * size], rows, cols))
    print(f"{split}: {n} images of {rows}x{cols}")
    return n


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, out = sys.argv[1], sys.argv[2]
    export(src, out, "train", "train")
    export(src, out, "t10k", "val")


if __name__ == "__main__":
    main()
