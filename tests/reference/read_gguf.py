"""Reads a GGUF file with the `gguf` package (a reader this crate did not write) and prints
one JSON object: the architecture, and per tensor its name, ggml dims, type id, and the
sum and sum of |x| of its values dequantized by `gguf.quants.dequantize` (float64).

    python read_gguf.py FILE.gguf
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

r = GGUFReader(sys.argv[1])
arch = r.fields["general.architecture"]
out = {"arch": bytes(arch.parts[arch.data[0]]).decode(), "tensors": []}
for t in r.tensors:
    v = dequantize(t.data, t.tensor_type).astype(np.float64)
    out["tensors"].append(
        {
            "name": t.name,
            "dims": [int(d) for d in t.shape],
            "type": int(t.tensor_type),
            "sum": float(v.sum()),
            "abs": float(np.abs(v).sum()),
        }
    )
print(json.dumps(out))
