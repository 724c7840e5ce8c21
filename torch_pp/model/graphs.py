"""A stage's decode step as replayed CUDA graphs, over KV caches preallocated per lane.

Why: a decode step of an eager stage launches a few hundred small kernels, and on an
accelerator the host spends longer launching each than the device spends running it
(``bench/RESULTS.md``, "captured steps"). CUDA graphs launch them in a few calls.

A graph fixes shapes and addresses, so each lane's keys and values live in a ``Slot``:
buffers sized for the whole context, written at a position held on the device. Attention
is the one operation whose shape grows with every token, so the step is captured in pieces
cut at each layer's attention (vLLM's piecewise graphs): between two pieces the attention
runs eagerly, through transformers' own sdpa function, on exactly the positions written so
far and with the step's own mask. Every other kernel is the one the eager layer launches on
the same shapes, and the tokens are transformers' own, bit for bit.

A step of a few tokens after a cached past (a speculative verification step: ``MAX_STEP_TOKENS``
at most) is captured the same way, one capture per step shape, so a stream alternating between
one-token steps and verification steps of any length replays every one of them. A lane may
move back (rank 0 cropped its cache after a rejected proposal): the slot's length is just set
back, and the next step overwrites the positions beyond it.

Prefills run eagerly into the same buffers. Slots are reused by later lanes of the same batch
size, and with them their captured pieces. Where the device cannot capture (CPU, MPS) a slot
runs its steps eagerly. Pure model math: no communication.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

log = logging.getLogger("torch_pp")

# Families whose decoder layers touch the cache only through ``update`` and attend to
# every earlier position (no sliding window), which is what a slot provides.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION = "torch_pp_pieces"  # the attention a stage with slots runs (see ``install``)
_capturing: list["Slot"] = []  # the slot whose step is being captured, if any
# Rank 0 captures in whichever thread runs a lane or a request, while other threads of the
# process may copy to and from the device (a caller moving its input ids, say). CUDA's default
# (global) capture mode fails the capture on such a copy in any thread (2x H200: cuBLAS
# "execution failed" mid-capture); the thread-local mode checks only the capturing thread.
# Device work from torch_pp's own threads waits for rank 0's device turn, held while capturing.
CAPTURE_MODE = "thread_local"
# Tokens a captured step may have: one decode token, or a verification step of a speculative
# proposal and its bonus token (transformers drafts 20 tokens at most by default).
MAX_STEP_TOKENS = 24


def replayable(hidden: torch.Tensor, past_len: int) -> bool:
    """Whether a step of ``hidden`` [B, S, H] after ``past_len`` cached positions may be replayed:
    a decode or verification step (prefills run eagerly: a graph per prompt length would not pay)."""
    return hidden.shape[1] == 1 or (past_len > 0 and hidden.shape[1] <= MAX_STEP_TOKENS)


def unsupported(config) -> str | None:
    """Why this model's stages cannot use slots and graphs, or None if they can."""
    if config.model_type not in FAMILIES:
        return f"captured decode steps cover {', '.join(FAMILIES)}, not {config.model_type}"
    if getattr(config, "_attn_implementation", None) not in ("sdpa", ATTENTION):
        return f"captured decode steps need sdpa attention, not {config._attn_implementation}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "captured decode steps need full attention in every layer (this model has a sliding window)"
    if any(t != "full_attention" for t in getattr(config, "layer_types", None) or ()):
        return "captured decode steps need full attention in every layer"
    return None


def install(config) -> None:
    """Make the layers built from ``config`` attend through ``_attention``: transformers' sdpa,
    except while a step is being captured, when it cuts the step into pieces."""
    AttentionInterface.register(ATTENTION, _attention)
    # Rank 0 builds the masks from the same config: sdpa's, or transformers would build none.
    AttentionMaskInterface.register(ATTENTION, AttentionMaskInterface._global_mapping["sdpa"])
    config._attn_implementation = ATTENTION


def _attention(module, query, key, value, attention_mask, **kwargs):
    if _capturing:
        return _capturing[-1].cut(module, query, key, value, kwargs)
    return AttentionInterface._global_mapping["sdpa"](module, query, key, value, attention_mask, **kwargs)


def slot_bytes(config, *, layers: int, batch: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of one slot's keys and values."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * layers * batch * kv_heads * max_len * head_dim * torch.tensor([], dtype=dtype).element_size()


class StaticKV:
    """One lane's keys and values for a stage's layers, ``max_len`` positions each.

    HF decoder layers write it through ``update`` as they would a ``DynamicCache``
    (``update(key, value, layer_idx, ...)``, any further arguments ignored).
    """

    def __init__(self, *, batch: int, max_len: int, device: torch.device) -> None:
        self.batch, self.max_len = batch, max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.index = torch.zeros(1, dtype=torch.long, device=device)  # a captured step's positions (its capture's own)
        self.captured = False  # True: write at ``index``, return the whole buffers (the attention slices)
        self.length = 0  # eager: positions written before this forward

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key, value: [B, kv_heads, S, head_dim]
        if layer_idx not in self.keys:
            self.keys[layer_idx] = key.new_zeros(self.batch, key.shape[1], self.max_len, key.shape[3])
            self.values[layer_idx] = value.new_zeros(self.batch, value.shape[1], self.max_len, value.shape[3])
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if self.captured:
            k.index_copy_(2, self.index, key)
            v.index_copy_(2, self.index, value)
            return k, v
        end = self.length + key.shape[2]
        k[:, :, self.length:end] = key
        v[:, :, self.length:end] = value
        return k[:, :, :end], v[:, :, :end]  # what a dynamic cache would hold: the same attention

    def layer(self, idx: int, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Layer ``idx``'s first ``length`` positions ``(keys, values)``, [B, kv_heads, length, D] views
        (None if it holds none)."""
        if idx not in self.keys:
            return None
        return self.keys[idx][:, :, :length], self.values[idx][:, :, :length]

    def fill(self, idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Layer ``idx``'s first positions become ``keys`` and ``values`` [B, kv_heads, L, D] (a row move)."""
        if idx not in self.keys:
            self.keys[idx] = keys.new_zeros(self.batch, keys.shape[1], self.max_len, keys.shape[3])
            self.values[idx] = values.new_zeros(self.batch, values.shape[1], self.max_len, values.shape[3])
        self.keys[idx][:, :, :keys.shape[2]] = keys
        self.values[idx][:, :, :values.shape[2]] = values

    def to_dynamic(self, length: int, config) -> DynamicCache:
        """The first ``length`` positions as a ``DynamicCache`` (a lane outgrowing its slot)."""
        cache = DynamicCache(config=config)
        for idx in sorted(self.keys):
            cache.update(self.keys[idx][:, :, :length].clone(), self.values[idx][:, :, :length].clone(), idx)
        return cache


class _Cut:
    """One layer's attention between two captured pieces: run eagerly at each replay."""

    def __init__(self, module, query, key, value, kwargs, out) -> None:
        self.module, self.query, self.key, self.value, self.kwargs, self.out = module, query, key, value, kwargs, out

    def run(self, length: int, mask) -> None:
        attn = AttentionInterface._global_mapping["sdpa"]
        out, _ = attn(self.module, self.query, self.key[:, :, :length], self.value[:, :, :length], mask, **self.kwargs)
        self.out.copy_(out)


class _Capture:
    """One step shape's captured pieces, with their static inputs, outputs and write positions."""

    def __init__(self, tokens: int, device: torch.device) -> None:
        self.tokens = tokens
        self.pieces: list[torch.cuda.CUDAGraph] = []  # pieces[i], cuts[i], ..., pieces[-1]
        self.cuts: list[_Cut] = []
        self.inputs: tuple[torch.Tensor, dict] | None = None  # static hidden state and layer arguments
        self.outs: list[torch.Tensor] = []  # each layer's output, as the last replay left it
        self.offsets = torch.arange(tokens, device=device)
        self.index = torch.zeros(tokens, dtype=torch.long, device=device)  # where the step writes


class Slot:
    """A ``StaticKV`` and its decode and verification steps, captured in pieces on first use of
    each step shape where ``capture``.

    Args:
        layers: Global layer index -> decoder layer (or its forward), the stage's layers in order
            (built from a config given to ``install``).
        cache_kw: The keyword the layers take their cache under.
        batch: Sequences in the lanes this slot serves.
        max_len: Positions per sequence.
        device: Where the layers run.
        capture: Capture decode steps (CUDA only); False runs every step eagerly.
        pool: The CUDA graph memory pool shared by one stage's graphs.
    """

    def __init__(self, layers: dict[int, nn.Module], *, cache_kw: str, batch: int, max_len: int,
                 device: torch.device, capture: bool, pool=None) -> None:
        self.layers, self.cache_kw, self.device = layers, cache_kw, device
        self.kv = StaticKV(batch=batch, max_len=max_len, device=device)
        self.capture, self.pool = capture, pool
        self.captures: dict[tuple, _Capture] = {}  # step signature -> its capture
        self.last: _Capture | None = None  # the capture replayed last
        self._open: torch.cuda.CUDAGraph | None = None
        self._capturing: _Capture | None = None

    @property
    def captured(self) -> bool:
        return bool(self.captures)

    @property
    def outs(self) -> list[torch.Tensor]:
        """Each layer's output, as the last replay left it."""
        return self.last.outs

    def run(self, layers_run: Callable[[StaticKV], torch.Tensor], past_len: int) -> torch.Tensor:
        """Run ``layers_run(cache)`` eagerly, writing positions from ``past_len`` on."""
        self.kv.captured, self.kv.length = False, past_len
        return layers_run(self.kv)

    def step(self, hidden: torch.Tensor, kwargs: dict, past_len: int) -> torch.Tensor | None:
        """One decode or verification step ([B, S, H] -> [B, S, H]) at positions from ``past_len`` on,
        from captured pieces; None where it is not captured (the caller runs it eagerly)."""
        return self.outs[-1].clone() if self.replay(hidden, kwargs, past_len) else None

    def replay(self, hidden: torch.Tensor, kwargs: dict, past_len: int) -> bool:
        """Run one step at positions from ``past_len`` on from captured pieces, leaving each layer's
        output in ``outs`` (overwritten by the next replay); False where it is not captured."""
        if not self.capture:
            return False
        signature = _signature(hidden, kwargs)
        if signature is None:
            return False
        cap = self.captures.get(signature)
        if cap is None:
            cap = self._capture(hidden, kwargs, past_len, signature)
            if cap is None:
                return False
        static_hidden, static_kwargs = cap.inputs
        static_hidden.copy_(hidden)
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor) and name != "attention_mask":
                static_kwargs[name].copy_(value)
            elif isinstance(value, tuple):
                for static, given in zip(static_kwargs[name], value):
                    static.copy_(given)
        torch.add(cap.offsets, past_len, out=cap.index)
        mask = kwargs.get("attention_mask")
        for piece, cut in zip(cap.pieces, cap.cuts):
            piece.replay()
            cut.run(past_len + cap.tokens, mask)
        cap.pieces[-1].replay()
        self.last = cap
        return True

    def cut(self, module, query, key, value, kwargs) -> tuple[torch.Tensor, None]:
        """While capturing: end the open piece at this attention, and open the next."""
        cap = self._capturing
        self._open.capture_end()
        cap.pieces.append(self._open)
        # [B, S, heads, head_dim], as transformers' attention functions return it
        out = query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[3])
        cap.cuts.append(_Cut(module, query, key, value, kwargs, out))
        self._open = torch.cuda.CUDAGraph()
        self._open.capture_begin(pool=self.pool, capture_error_mode=CAPTURE_MODE)
        return out, None

    def _layers(self, hidden: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        outs = []
        for layer in self.layers.values():
            out = layer(hidden, **kwargs, **{self.cache_kw: self.kv})
            hidden = out[0] if isinstance(out, tuple) else out
            outs.append(hidden)
        return outs

    def _capture(self, hidden: torch.Tensor, kwargs: dict, past_len: int, signature) -> _Capture | None:
        cap = _Capture(hidden.shape[1], self.device)
        static_kwargs = {name: value.clone() if isinstance(value, torch.Tensor) else
                         tuple(v.clone() for v in value) if isinstance(value, tuple) else value
                         for name, value in kwargs.items() if name != "attention_mask"}
        static_kwargs["attention_mask"] = None  # the mask is only read by the cuts, given at each replay
        cap.inputs = (hidden.clone(), static_kwargs)
        # Warm up on a side stream first (cuBLAS workspaces, lazy allocations), as CUDA graphs require.
        # It computes this very step, eagerly, so its cache writes are the real ones.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.run(lambda kv: self._layers(hidden, kwargs), past_len)
            self.kv.captured, self.kv.index = True, cap.index
            self._open, self._capturing = torch.cuda.CUDAGraph(), cap
            _capturing.append(self)
            try:
                self._open.capture_begin(pool=self.pool, capture_error_mode=CAPTURE_MODE)
                cap.outs = self._layers(*cap.inputs)
                self._open.capture_end()
                cap.pieces.append(self._open)
                self.captures[signature] = cap
            except Exception as exc:  # noqa: BLE001 - a layer that cannot be captured runs eagerly
                log.warning("decode steps run eagerly: capturing one failed (%s)", exc)
                try:
                    self._open.capture_end()
                except RuntimeError:
                    pass
                self.captures, self.capture, cap = {}, False, None
            finally:
                _capturing.pop()
                self._open = self._capturing = None
        torch.cuda.current_stream(self.device).wait_stream(side)
        return cap


def _signature(hidden: torch.Tensor, kwargs: dict):
    """Shapes, dtypes and plain values of a step's graph inputs, or None if one cannot be one."""
    parts = [(tuple(hidden.shape), hidden.dtype)]
    for name, value in sorted(kwargs.items()):
        if name == "attention_mask":
            continue  # read by the cuts at each replay, not by the pieces
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape), value.dtype))
        elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            parts.append((name, tuple((tuple(v.shape), v.dtype) for v in value)))
        elif isinstance(value, (bool, int, float, str, type(None))):
            parts.append((name, value))
        else:
            return None
    return tuple(parts)
