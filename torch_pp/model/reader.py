"""Reading single tensors (or their last rows) of a safetensors file with plain reads.

No memory map: see ``SafetensorsReader``. Used by ``model.loading``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..dtypes import SAFETENSORS, to_torch
from ..errors import ModelFolderError

_ST_DTYPES = {code: to_torch(name) for code, name in SAFETENSORS.items()}


class SafetensorsReader:
    """Reads single tensors of a safetensors file with plain reads into fresh buffers.

    ``safe_open`` memory-maps the file, and mapped pages that a copy reads count in the
    process's resident memory next to the copy: a loading stage would peak at twice its
    share. Reading each tensor straight into its own buffer keeps the peak at the share.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "rb")
        (n,) = struct.unpack("<Q", self._f.read(8))
        self.header = json.loads(self._f.read(n))
        self.header.pop("__metadata__", None)
        self._data_start = 8 + n

    def read(self, key: str, *, first_row: int = 0) -> torch.Tensor:
        """Tensor ``key``, or its rows from ``first_row`` on (rows are contiguous: only those are read)."""
        info = self.header[key]
        start, end = info["data_offsets"]
        shape = list(info["shape"])
        if first_row:
            row_bytes = (end - start) // shape[0]
            start, shape[0] = start + first_row * row_bytes, shape[0] - first_row
        out = torch.empty(shape, dtype=_ST_DTYPES[info["dtype"]])
        if end > start:
            self._f.seek(self._data_start + start)
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            got = self._f.readinto(view)
            if got != end - start:
                raise ModelFolderError(f"{self.path} is truncated: {key} needs {end - start} bytes, got {got}")
        return out

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
