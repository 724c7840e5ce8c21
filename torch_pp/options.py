"""Start options and generation-argument checks, validated before anything joins or loads.

``StartOptions`` is the one description of how a pipeline starts: ``start()`` takes it,
the CLI builds it from its flags, and a notebook driver sends it to its workers as JSON.
It validates itself on construction, so a typo or an out-of-range value fails at once, on
the caller's side, before any process group exists. Pure: imports neither torch nor
transformers, so the command line can refuse bad input in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Mapping

from .dtypes import COMPUTE as DTYPE_NAMES
from .errors import OptionsError

BALANCES = ("auto", "memory", "compute", "even")
QUANTIZE_MODES = ("int8", "int4")  # weight-only, per stage while it loads (see model.quant)
INT4_GROUP = 32  # input channels per int4 scale and zero (llama.cpp's Q4 blocks are 32 wide too)
DEFAULT_FRAME_BYTES = 32 * 1024  # a decode step's message fits one frame (see net.wire)
_DEVICE = re.compile(r"(cpu|mps|auto|cuda(:\d+)?)")


def parse_bytes(text: str) -> int:
    """``"128GiB"``, ``"96GB"``, ``"512MiB"`` or a plain number of bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise OptionsError(f"bad memory size {text!r}; use e.g. 128GiB, 96GB or 512MiB")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    scale = {"B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(float(m.group(1)) * scale)


@dataclass(frozen=True)
class StartOptions:
    """How a pipeline starts; the same on every rank. See ``torch_pp.start`` for each field.

    Raises:
        OptionsError: on construction, for a value out of range (the message names the field).
    """

    model: str | None = None
    layers: str | None = None
    balance: str = "auto"
    context: int = 4096
    batch: int = 1
    max_memory: int | None = None
    prefill_chunk: int | None = None
    device: str | None = None
    dtype: str | None = None
    progress: bool = True
    quantize: str | None = None
    graphs: bool | None = None
    split_head: bool | None = None
    draft_model: str | None = None

    def __post_init__(self) -> None:
        for name in ("model", "draft_model"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))
        if self.balance not in BALANCES:
            raise OptionsError(f"balance must be one of {', '.join(BALANCES)}, not {self.balance!r}")
        for name in ("context", "batch"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionsError(f"{name} must be a whole number of at least 1, not {value!r}")
        if self.max_memory is not None and (not isinstance(self.max_memory, int) or self.max_memory <= 0):
            raise OptionsError(f"max_memory must be a positive number of bytes, not {self.max_memory!r}")
        if self.prefill_chunk is not None and (not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 0):
            raise OptionsError(f"prefill_chunk must be None (automatic), 0 (off) or a positive token count, not {self.prefill_chunk!r}")
        if self.dtype not in (None, "", "auto", *DTYPE_NAMES):
            raise OptionsError(f"unsupported dtype {self.dtype!r}; choose one of {', '.join(DTYPE_NAMES)}")
        for name in ("graphs", "split_head"):
            if getattr(self, name) not in (None, True, False):
                raise OptionsError(f"{name} must be None (automatic), True or False, not {getattr(self, name)!r}")
        if self.quantize not in (None, *QUANTIZE_MODES):
            raise OptionsError(f"unsupported quantization {self.quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
        if self.device not in (None, "") and not _DEVICE.fullmatch(str(self.device)):
            raise OptionsError(f"unsupported device {self.device!r}; use cpu, cuda, cuda:N or mps")
        if self.layers is not None and not re.fullmatch(r"\s*\d+:\d+(\s*,\s*\d+:\d+)*\s*", self.layers):
            raise OptionsError(f"bad --layers {self.layers!r}; expected one START:END per rank, e.g. 0:10,10:30")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "StartOptions":
        return cls(**json.loads(text))


# name -> (accepts(value), the valid range in words); transformers' own processors refuse most of
# these only once generation starts, and silently ignore a top_p above 1.
_SAMPLING = {
    "temperature": (lambda v: v > 0, "a number > 0"),
    "top_k": (lambda v: v >= 0 and float(v).is_integer(), "a whole number >= 0 (0: off)"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "min_p": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "a number > 0 (1: off)"),
    "max_new_tokens": (lambda v: v >= 0 and float(v).is_integer(), "a whole number >= 0"),
    "min_new_tokens": (lambda v: v >= 0 and float(v).is_integer(), "a whole number >= 0"),
}


def check_generation_args(**values) -> None:
    """Refuse sampling and length arguments out of range, naming the argument and its valid range.

    None means "not given" and is accepted.

    Raises:
        OptionsError: for the first argument out of range.
    """
    for name, value in values.items():
        if value is None or name not in _SAMPLING:
            continue
        accepts, valid = _SAMPLING[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not accepts(value):
            raise OptionsError(f"{name}={value!r} is out of range: it must be {valid}")


@dataclass(frozen=True)
class Settings:
    """The ``TORCH_PP_*`` environment, read when asked (``Settings.from_env()``), never at import,
    so a notebook or a test can change a variable between pipelines.

    Attributes:
        device: ``TORCH_PP_DEVICE``: the device when none is given (None: the best available).
        stale_s: ``TORCH_PP_STALE_S``: seconds without a heartbeat before a rank on another
            machine counts as lost.
        join_timeout_s: ``TORCH_PP_JOIN_TIMEOUT``: seconds to meet the other ranks and form the group.
        frame_bytes: ``TORCH_PP_FRAME_BYTES``: size of every message's first frame (the same on every rank).
        sim_link: ``TORCH_PP_SIM_LINK``: a simulated network link for benchmarks (see ``net.link``).
        cache: ``TORCH_PP_CACHE``: where the converted default model lives (None: ``~/.cache/torch_pp``).
        placements: ``TORCH_PP_PLACEMENTS``: where placements measured on the machines are kept for
            the next start (None: ``placements`` in the cache folder; ``off``: neither kept nor used;
            see ``placement.remembered``).
        debug: ``TORCH_PP_DEBUG``: log what each rank does.
        fuse: ``TORCH_PP_FUSE``: fuse the norms and MLPs of captured decode steps with inductor
            (CUDA only; ``0`` runs them as transformers' eager modules: see ``model.fusion``).

    Raises:
        OptionsError: for a value out of range, naming the variable.
    """

    device: str | None = None
    stale_s: float = 8.0
    join_timeout_s: float = 300.0
    frame_bytes: int = DEFAULT_FRAME_BYTES
    sim_link: str | None = None
    cache: str | None = None
    placements: str | None = None
    debug: bool = False
    fuse: bool = True

    _VARS = {"device": "TORCH_PP_DEVICE", "stale_s": "TORCH_PP_STALE_S", "join_timeout_s": "TORCH_PP_JOIN_TIMEOUT",
             "frame_bytes": "TORCH_PP_FRAME_BYTES", "sim_link": "TORCH_PP_SIM_LINK", "cache": "TORCH_PP_CACHE",
             "placements": "TORCH_PP_PLACEMENTS", "debug": "TORCH_PP_DEBUG",
             "fuse": "TORCH_PP_FUSE"}

    def __post_init__(self) -> None:
        for name in ("stale_s", "join_timeout_s"):
            if not getattr(self, name) > 0:
                raise OptionsError(f"{self._VARS[name]} must be a positive number of seconds, not {getattr(self, name)!r}")
        if self.frame_bytes < 4096:
            raise OptionsError(f"TORCH_PP_FRAME_BYTES must be at least 4096, not {self.frame_bytes}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """Read the variables now (from ``environ``, default ``os.environ``); unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict = {}
        for name, var in cls._VARS.items():
            text = env.get(var)
            if not text:
                continue
            kind = type(getattr(cls, name))
            if kind is bool:
                values[name] = text.lower() not in ("0", "false", "no")
            elif kind in (int, float):
                try:
                    values[name] = kind(text)
                except ValueError:
                    raise OptionsError(f"{var}={text!r} is not a number") from None
            else:
                values[name] = text
        return cls(**values)


# torchrun's rank variables: a helper process must not think it is a rank of this group.
_RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def child_env() -> dict[str, str]:
    """The environment for a helper process: this one's, without torchrun's rank variables."""
    return {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
