#!/usr/bin/env python3
"""Extracts Jane Austen's six novels from the R lazy-load database shipped by Debian's
`r-cran-janeaustenr` (data/Rdata.rdx + data/Rdata.rdb) into plain UTF-8 text files,
one line of the book per line. Needs only the PyPI package `rdata` (no R).

    python austen_txt.py PATH/TO/janeaustenr/data/Rdata OUT_DIR

The .rdx index is an .rds file (a gzip-compressed serialized R list) whose `variables` entry maps each
object name to an (offset, length) in the .rdb file; every .rdb record is a 4-byte
big-endian uncompressed length followed by a zlib stream of one serialized R object.
"""

import bz2
import gzip
import lzma
import os
import struct
import sys
import zlib

import warnings

import rdata

warnings.filterwarnings("ignore", message="Unknown file type")


def decompress(blob: bytes) -> bytes:
    """One lazy-load record: 4-byte length, then zlib (or, with a type byte, bzip2/xz)."""
    (n,) = struct.unpack(">I", blob[:4])
    body = blob[4:]
    kind = body[:1]
    if kind == b"Z":
        out = zlib.decompress(body[1:])
    elif kind == b"2":
        out = bz2.decompress(body[1:])
    elif kind == b"X":
        out = lzma.decompress(body[1:])
    elif kind == b"0":
        out = body[1:]
    else:
        out = zlib.decompress(body)
    if len(out) != n:
        raise ValueError(f"record length {len(out)} != header {n}")
    return out


def convert(raw: bytes):
    return rdata.conversion.convert(rdata.parser.parse_data(raw))


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    base, out_dir = sys.argv[1], sys.argv[2]
    with open(base + ".rdx", "rb") as f:
        head = f.read()
    # The index is an ordinary (gzip-compressed) .rds file.
    index = convert(gzip.decompress(head) if head[:2] == b"\x1f\x8b" else decompress(head))
    variables = index["variables"]
    os.makedirs(out_dir, exist_ok=True)
    with open(base + ".rdb", "rb") as f:
        rdb = f.read()
    written = 0
    for name, pos in variables.items():
        offset, length = (int(x) for x in list(pos)[:2])
        obj = convert(decompress(rdb[offset : offset + length]))
        lines = [("" if s is None else str(s)) for s in list(obj)]
        if not lines or not all(isinstance(s, str) for s in lines):
            continue
        path = os.path.join(out_dir, f"{name}.txt")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
        written += 1
        print(f"[austen_txt] {path}: {len(lines)} lines, {os.path.getsize(path)} bytes")
    if written == 0:
        sys.exit("no character vectors found in the lazy-load database")


if __name__ == "__main__":
    main()
