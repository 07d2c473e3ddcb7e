"""Is a checkpoint's weight file a whole safetensors file? Checked from its header alone (never the
weights): a truncated download or a garbage file is one line before any step runs, not a traceback
from deep inside a load.

Format: u64 little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets: [b, e]},
"__metadata__": {...}}`, then the data; every tensor's `e - b` is its element count times its dtype's
size, and the last `e` is the data's length.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .errors import DataError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
MAX_HEADER = 100 * 2**20  # safetensors' own limit


def header_problem(path: Path) -> str | None:
    """What is wrong with `path` as a safetensors file (from its header and its size), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes: shorter than a header"
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                return f"header length {n} does not fit the file's {size} bytes"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except (ValueError, UnicodeDecodeError):
        return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            b, e = (int(x) for x in t["data_offsets"])
            want = math.prod(int(d) for d in t["shape"]) * DTYPE_BYTES[t["dtype"]]
        except (TypeError, KeyError, ValueError):
            return f"tensor {name!r} has no valid dtype, shape and data_offsets"
        if e - b != want or b < 0:
            return f"tensor {name!r} spans {e - b} bytes, its shape and dtype need {want}"
        end = max(end, e)
    if 8 + n + end > size:
        return f"truncated: its tensors need {8 + n + end} bytes, the file has {size}"
    return None


def check_weights(folder: Path, field: str = "model.ref", ref: str | None = None) -> None:
    """Every `*.safetensors` file of a checkpoint folder (and every shard its index names) is whole;
    DataError naming the file otherwise."""
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise DataError(field, ref or str(folder), "a checkpoint whose model.safetensors.index.json is valid") from None
        for s in sorted(shards):
            if not (folder / s).is_file():
                raise DataError(field, ref or str(folder), f"a complete checkpoint (shard {s} is missing)")
    for f in files:
        why = header_problem(f)
        if why:
            raise DataError(field, ref or str(folder), f"a checkpoint whose {f.name} is a whole safetensors file",
                            why)
