"""The tensors of a checkpoint folder, read one at a time (`TensorFiles`, with scratch spills of
modified layers), and safetensors shards written straight from the tensors' memory
(`write_safetensors`, `ShardWriter`)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from .errors import DataError


class TensorFiles:
    """The named tensors of a checkpoint folder (one file, or shards + index), read one at a time."""

    def __init__(self, folder: str | Path, prefix_alias: str = ""):
        self.folder = Path(folder)
        self.where: dict[str, Path] = {}
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            wm = json.loads(index.read_text())["weight_map"]
            self.where = {k: self.folder / v for k, v in wm.items()}
        else:
            from safetensors import safe_open

            for f in sorted(self.folder.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as fh:
                    for k in fh.keys():
                        self.where[k] = f
        if not self.where:
            raise DataError("model", str(folder), "a checkpoint folder with safetensors weights")
        # stock checkpoints of some families omit the base-model prefix (OPT: "decoder.…")
        self.alias = prefix_alias
        self.spill_dir: Path | None = None

    def key(self, name: str) -> str | None:
        if name in self.where:
            return name
        if self.alias and name.startswith(self.alias + ".") and name[len(self.alias) + 1 :] in self.where:
            return name[len(self.alias) + 1 :]
        return None

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """{name: tensor} (CPU, the file's dtype), grouped by file so each file is opened once."""
        from safetensors import safe_open

        by_file: dict[Path, list[tuple[str, str]]] = {}
        for n in names:
            k = self.key(n)
            if k is None:
                raise DataError("model", str(self.folder), "a checkpoint whose tensors match its config", f"missing {n}")
            by_file.setdefault(self.where[k], []).append((n, k))
        out = {}
        for f, items in by_file.items():
            with safe_open(str(f), framework="pt") as fh:
                for n, k in items:
                    out[n] = fh.get_tensor(k)
        return out

    def spill(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write modified tensors to a scratch file; later reads of those names come from it."""
        from safetensors.torch import save_file

        if self.spill_dir is None:
            base = os.environ.get("PRUNEFLOW_SCRATCH") or None
            self.spill_dir = Path(tempfile.mkdtemp(prefix=f"pruneflow-spill-{owner_tag()}-", dir=base))
            weakref.finalize(self, shutil.rmtree, str(self.spill_dir), True)
        f = self.spill_dir / f"spill-{len(list(self.spill_dir.iterdir())):05d}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(f))
        for k in tensors:
            self.where[k] = f


def owner_tag() -> str:
    """`<pid>.<host digest>`: the owner tag of a spill's name, the one `tasks.journal.owner_tag` gives."""
    import socket

    return f"{os.getpid()}.{hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]}"



_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """A safetensors file written straight from the tensors' memory (safetensors' own `save_file`
    first serialises the whole shard into one bytes object: a second copy of it in memory).
    Format: u64 little-endian header length, JSON header {name: dtype, shape, data_offsets}, data."""
    header: dict = {"__metadata__": dict(metadata or {})}
    off = 0
    items = sorted(tensors.items())
    for k, t in items:
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as fh:
        fh.write(len(hb).to_bytes(8, "little"))
        fh.write(hb)
        for _k, t in items:
            if t.numel():
                fh.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))


class ShardWriter:
    """Accumulate tensors and write them as safetensors shards of at most ~`shard_bytes`."""

    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, max(1, int(shard_bytes))
        self.buf: dict[str, torch.Tensor] = {}
        self.buf_bytes = 0
        self.files: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.buf[k] = v.detach().to("cpu").contiguous()
            n = v.numel() * v.element_size()
            self.buf_bytes += n
            self.total += n
        if self.buf_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        f = self.folder / f".shard-{len(self.files):05d}.safetensors"
        write_safetensors(f, self.buf, metadata={"format": "pt"})
        self.files.append((f, list(self.buf)))
        self.buf, self.buf_bytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.files[0][0], self.folder / "model.safetensors")
            return
        n = len(self.files)
        wm = {}
        for j, (f, keys) in enumerate(self.files):
            name = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
            os.replace(f, self.folder / name)
            wm.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(wm.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
