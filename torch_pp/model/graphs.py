"""A stage's decode step as one replayed CUDA graph, over KV caches preallocated per lane.

Why: a decode step of an eager stage launches a few hundred small kernels, and on an
accelerator the host spends longer launching each than the device spends running it
(``bench/RESULTS.md``, "captured steps"). A CUDA graph launches them in one call.

A graph fixes shapes and addresses, so each lane's keys and values live in a ``Slot``:
buffers sized for the whole context, written at positions held on the device. Attention is
the one operation whose shape grows with every token, so a captured step attends over a
fixed *bucket* of positions (the next power of two, 256 at least, up to the slot's length),
the positions not yet written masked out, as transformers' static caches do (a bucket, not
the whole context: a long slot would otherwise cost a short stream its whole length). Each
step shape and bucket is captured once, on first use; a stream crosses a bucket's end a few
times over its life. The mask comes from the device-held positions and the step's own mask
(a batch's padding), copied in before each replay. The query heads of one key/value head
are packed along the query positions (transformers' ``pack_gqa``, there for one token only),
so grouped heads are never repeated, whatever the bucket. Before, the step was captured in
pieces cut at each attention, which ran eagerly between them (one graph launch and one eager
attention per layer: ``bench/RESULTS.md``, "whole steps").

A step of a few tokens after a cached past (a speculative verification step: ``MAX_STEP_TOKENS``
at most) is captured the same way, so a stream alternating between one-token steps and
verification steps of any length replays every one of them. A lane may move back (rank 0
cropped its cache after a rejected proposal): the slot's length is just set back, and the next
step overwrites the positions beyond it (the mask hides them until then).

Prefills run eagerly into the same buffers. Slots are reused by later lanes of the same batch
size, and with them their captured steps. Where the device cannot capture (CPU, MPS) a slot
runs the very step a graph records, only by calling it (so tests check its masks and positions
anywhere). Tokens: in float32 those of transformers' eager layers; in bfloat16 the masked kernel
rounds like transformers' compiled static-cache decoding, not always like its eager one. Pure
model math: no communication.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface

from . import fusion

log = logging.getLogger("torch_pp")

# Families whose decoder layers touch the cache only through ``update`` and attend to
# every earlier position (no sliding window), which is what a slot provides.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION = "torch_pp_slots"  # the attention a stage with slots runs (see ``install``)
# The keyword a recorded step passes its ``_Capture`` under, through transformers' layers (their
# keyword arguments reach the attention function) to ``_attention``: only that step's attention
# goes to the bucket (rank 0 runs other lanes' prefills, in other threads, through the same layers).
STEP_KW = "torch_pp_step"
# The CUDA streams slots record on now (warm-up and capture): their steps' norms and MLPs run
# fused (``model.fusion``); any other stream's calls of the same modules run eagerly.
_fusing_streams: set[int] = set()
# Rank 0 captures in whichever thread runs a lane or a request, while other threads of the
# process may copy to and from the device (a caller moving its input ids, say). CUDA's default
# (global) capture mode fails the capture on such a copy in any thread (2x H200: cuBLAS
# "execution failed" mid-capture); the thread-local mode checks only the capturing thread.
# Device work from torch_pp's own threads waits for rank 0's device turn, held while capturing.
CAPTURE_MODE = "thread_local"
# Tokens a captured step may have: one decode token, or a verification step of a speculative
# proposal and its bonus token (transformers drafts 20 tokens at most by default).
MAX_STEP_TOKENS = 24
MIN_BUCKET = 256  # positions a captured step attends over at least (the slot's length if shorter)


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
    except in a step a slot records, which attends over its bucket."""
    AttentionInterface.register(ATTENTION, _attention)
    # Rank 0 builds the masks from the same config: sdpa's, or transformers would build none.
    AttentionMaskInterface.register(ATTENTION, AttentionMaskInterface._global_mapping["sdpa"])
    config._attn_implementation = ATTENTION


def _attention(module, query, key, value, attention_mask, torch_pp_step=None, **kwargs):
    if torch_pp_step is not None:  # STEP_KW
        return torch_pp_step.attend(module, query, key, value, kwargs)
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


def bucket(length: int, max_len: int) -> int:
    """The positions a captured step over ``length`` cached and new positions attends over."""
    return min(max_len, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


class _Capture:
    """One step shape's recorded step over one bucket: its static inputs, outputs, write positions
    and attention mask, and its CUDA graph (None where the step is run as recorded, off CUDA)."""

    def __init__(self, hidden: torch.Tensor, kwargs: dict, span: int) -> None:
        batch, self.tokens = hidden.shape[:2]
        self.span, device = span, hidden.device
        static = {name: value.clone() if isinstance(value, torch.Tensor) else
                  tuple(v.clone() for v in value) if isinstance(value, tuple) else value
                  for name, value in kwargs.items() if name != "attention_mask"}
        static["attention_mask"] = None  # replaced by ``given``, read by ``attend``
        self.inputs = (hidden.clone(), static)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outs: list[torch.Tensor] = []  # each layer's output, as the last replay left it
        self.offsets = torch.arange(self.tokens, device=device)
        self.index = torch.zeros(self.tokens, dtype=torch.long, device=device)  # where the step writes
        self.columns = torch.arange(span, device=device)
        # [B, 1, S, span]: the step's own mask (a batch's padding) over the positions written so far
        self.given = torch.ones(batch, 1, self.tokens, span, dtype=torch.bool, device=device)
        self.bias: torch.Tensor | None = None  # the step's attention bias, made at its first attention

    def load(self, hidden: torch.Tensor, kwargs: dict, past_len: int) -> None:
        """Copy one step's inputs into the static ones."""
        static_hidden, static_kwargs = self.inputs
        static_hidden.copy_(hidden)
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor) and name != "attention_mask":
                static_kwargs[name].copy_(value)
            elif isinstance(value, tuple):
                for static, given in zip(static_kwargs[name], value):
                    static.copy_(given)
        torch.add(self.offsets, past_len, out=self.index)
        mask = kwargs.get("attention_mask")
        if mask is None:
            self.given.fill_(True)  # causal only: ``attend`` masks what lies beyond each position
        else:
            self.given[..., :past_len + self.tokens].copy_(mask)

    def attend(self, module, query, key, value, kwargs) -> tuple[torch.Tensor, None]:
        """One layer's attention over the bucket: query [B, H, S, D]; key, value the slot's whole
        buffers [B, kv_heads, max_len, D]; returns [B, S, H, D] as transformers' functions do."""
        b, heads, s, d = query.shape
        groups = heads // key.shape[1]
        if self.bias is None:  # once per step, shared by its layers: written positions up to each query's own
            visible = (self.columns <= self.index[:, None]) & self.given  # [B, 1, S, span]
            bias = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill_(~visible, float("-inf"))
            self.bias = bias.repeat(1, 1, groups, 1)  # [B, 1, groups * S, span], rows as the packed queries'
        # the query heads of one key/value head packed along the positions: [B, kv_heads, groups * S, D]
        packed = query.reshape(b, key.shape[1], groups * s, d)
        scale = kwargs.get("scaling", getattr(module, "scaling", None))
        out = F.scaled_dot_product_attention(packed, key[:, :, :self.span], value[:, :, :self.span],
                                             attn_mask=self.bias, scale=scale)
        return out.reshape(b, heads, s, d).transpose(1, 2).contiguous(), None


class Slot:
    """A ``StaticKV`` and its decode and verification steps, recorded on first use of each step shape
    and bucket where ``capture`` (as CUDA graphs on CUDA; called as recorded elsewhere).

    Args:
        layers: Global layer index -> decoder layer (or its forward), the stage's layers in order
            (built from a config given to ``install``).
        cache_kw: The keyword the layers take their cache under.
        batch: Sequences in the lanes this slot serves.
        max_len: Positions per sequence.
        device: Where the layers run.
        capture: Record decode steps; False runs every step eagerly with transformers' own attention.
        pool: The CUDA graph memory pool shared by one stage's graphs.
        fuse: Fuse the captured steps' norms and MLPs (``model.fusion``; CUDA graphs only).
    """

    def __init__(self, layers: dict[int, nn.Module], *, cache_kw: str, batch: int, max_len: int,
                 device: torch.device, capture: bool, pool=None, fuse: bool = False) -> None:
        self.layers, self.cache_kw, self.device = layers, cache_kw, device
        self.kv = StaticKV(batch=batch, max_len=max_len, device=device)
        self.capture, self.pool = capture, pool
        self.graphed = capture and device.type == "cuda"  # replays launch CUDA graphs
        self.fuse = fuse and self.graphed and fusion.prepare(layers.values(), when=_fusing) > 0
        self.captures: dict[tuple, _Capture] = {}  # (step signature, bucket) -> its capture
        self.last: _Capture | None = None  # the capture replayed last

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
        as recorded; None where it cannot be (the caller runs it eagerly)."""
        return self.outs[-1].clone() if self.replay(hidden, kwargs, past_len) else None

    def replay(self, hidden: torch.Tensor, kwargs: dict, past_len: int) -> bool:
        """Run one step at positions from ``past_len`` on as recorded, leaving each layer's output in
        ``outs`` (overwritten by the next replay); False where it cannot be."""
        if not self.capture:
            return False
        signature, length = _signature(hidden, kwargs), past_len + hidden.shape[1]
        mask = kwargs.get("attention_mask")
        if signature is None or mask is not None and (mask.dtype != torch.bool or mask.shape[-1] != length):
            return False
        key = (signature, bucket(length, self.kv.max_len))
        cap = self.captures.get(key)
        if cap is None:
            cap = self.captures[key] = _Capture(hidden, kwargs, key[1])
            if self.graphed and not self._capture(cap, hidden, kwargs, past_len):
                return False
        cap.load(hidden, kwargs, past_len)
        if cap.graph is not None:
            cap.graph.replay()
        else:
            cap.outs = self._recorded(cap)
        self.last = cap
        return True

    def _layers(self, hidden: torch.Tensor, kwargs: dict) -> list[torch.Tensor]:
        outs = []
        for layer in self.layers.values():
            out = layer(hidden, **kwargs, **{self.cache_kw: self.kv})
            hidden = out[0] if isinstance(out, tuple) else out
            outs.append(hidden)
        return outs

    def _recorded(self, cap: _Capture) -> list[torch.Tensor]:
        """The recorded step on ``cap``'s static inputs: written at its positions, attending over its bucket."""
        self.kv.captured, self.kv.index, cap.bias = True, cap.index, None
        hidden, kwargs = cap.inputs
        return self._layers(hidden, {**kwargs, STEP_KW: cap})

    def _capture(self, cap: _Capture, hidden: torch.Tensor, kwargs: dict, past_len: int) -> bool:
        # Warm up on a side stream first (cuBLAS workspaces, lazy allocations), as CUDA graphs require.
        # It computes this very step, eagerly, so its cache writes are the real ones.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.run(lambda kv: self._layers(hidden, kwargs), past_len)
            cap.load(hidden, kwargs, past_len)
            if self.fuse:
                _fusing_streams.add(side.cuda_stream)
                # the fused step once uncaptured (compiling it): it rewrites the same positions
                self.fuse = fusion.warm(lambda: self._recorded(cap))
            # capture_begin, not ``torch.cuda.graph``: that one empties the allocator's cache at each capture
            graph = torch.cuda.CUDAGraph()
            try:
                graph.capture_begin(pool=self.pool, capture_error_mode=CAPTURE_MODE)
                try:
                    cap.outs = self._recorded(cap)
                finally:
                    graph.capture_end()
                cap.graph = graph
            except Exception as exc:  # noqa: BLE001 - a layer that cannot be captured runs eagerly
                log.warning("decode steps run eagerly: capturing one failed (%s)", exc)
                self.captures, self.capture, self.graphed = {}, False, False
            finally:
                _fusing_streams.discard(side.cuda_stream)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return self.capture


def _fusing() -> bool:
    """Whether the calling thread's current stream is one a slot records a fused step on."""
    return bool(_fusing_streams) and torch.cuda.current_stream().cuda_stream in _fusing_streams


def _signature(hidden: torch.Tensor, kwargs: dict):
    """Shapes, dtypes and plain values of a step's graph inputs, or None if one cannot be one."""
    parts = [(tuple(hidden.shape), hidden.dtype)]
    for name, value in sorted(kwargs.items()):
        if name == "attention_mask":
            continue  # copied into the capture's own mask at each replay
        if isinstance(value, torch.Tensor):
            parts.append((name, tuple(value.shape), value.dtype))
        elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):
            parts.append((name, tuple((tuple(v.shape), v.dtype) for v in value)))
        elif isinstance(value, (bool, int, float, str, type(None))):
            parts.append((name, value))
        else:
            return None
    return tuple(parts)
