"""Every dtype name torch_pp knows, in one table: what a stage computes in, what a checkpoint
holds (safetensors codes) and what travels on the wire.

Pure strings, so the command line can check ``--dtype`` before importing torch; ``to_torch``
turns a name into the torch dtype where torch is wanted.
"""

from __future__ import annotations

COMPUTE = ("float32", "float16", "bfloat16")  # what a stage may compute in
# name -> safetensors code; every one of them may travel between stages too
_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "complex64": "C64",  # rotary tables of some families (llama4, deepseek_v2) travel as complex numbers
}
WIRE = tuple(_CODES)
SAFETENSORS = {code: name for name, code in _CODES.items()}  # safetensors code -> name


def to_torch(name: str):
    """The torch dtype called ``name`` (one of ``WIRE``)."""
    import torch

    return getattr(torch, name)


def name_of(dtype) -> str:
    """A torch dtype's name as in this table (``torch.bfloat16`` -> ``"bfloat16"``)."""
    return str(dtype).removeprefix("torch.")
