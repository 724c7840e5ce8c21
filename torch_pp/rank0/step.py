"""One forward pass of rank 0's model: the state its hooks and placeholders share, as an argument.

The forward hook (``rank0.forward``) makes a ``Step`` for every forward of rank 0's model and
passes it to the model's own Hugging Face forward under the keyword ``KEYWORD``. transformers
hands every keyword of a forward on to each decoder layer (its ``**kwargs``), so rank 0's own
layers (``rank0.local``) and the placeholders of the others' (``rank0.placeholders``) receive it
with the layer's other arguments, take it out, and keep there what one layer leaves for the next:
the remote layers' arguments gathered so far, the lane and length of the cache, and what the
ring is to ask for. Nothing of a step lives in a thread-local: several threads (lanes, a
server's requests) run forwards at once, each with its own step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import StageError

#: The keyword a step travels under through transformers' forward to the decoder layers.
KEYWORD = "torch_pp_step"


@dataclass(eq=False)
class OwnLayers:
    """What rank 0's own layers over slots keep during one forward (see ``rank0.local``).

    Attributes:
        lane: The lane of the KV cache object HF passes.
        kv: That lane's slot (``model.graphs.Slot``) or dynamic cache.
        cache: What each layer is given as its cache (the slot's keys and values, or ``kv``).
        shared: The arguments the first layer was given, which a replay was captured for.
        replayed: Whether the whole step was replayed at the first layer.
    """

    lane: int
    kv: object
    cache: object
    shared: dict = field(default_factory=dict)
    replayed: bool = False


@dataclass(eq=False)
class Step:
    """One forward pass of rank 0's model.

    Set by the forward hook:
        reply: False for a pipelined prefill's non-final chunk: the stages answer nothing.
        keep: The last positions whose hidden state rank 0 needs back (0: all).
        collect: Also bring back every remote layer's output (``output_hidden_states``).

    Filled as the layers run:
        pending: Global layer index -> the arguments each remote layer was given, for the ring.
        past_len: Tokens already in this lane's caches on the stages.
        rewind: Rank 0's cache of this lane holds fewer tokens than were sent for it: HF cropped it
            (a rejected speculative proposal), and the stages crop theirs to ``past_len`` too.
        record: Rank 0's cache records its past for crops (sliding-window layers keep more than
            their window until the next crop); the stages' caches do the same.
        lane: Which KV cache the stages use (0: no cache).
        use_cache: Whether the stages keep this step in their caches.
        sentinels: Remote layers whose cache lengths HF reads (``placeholders.sentinel_layers``).
        states: With ``collect``: ``[input of the remote span, each remote layer's output...]``.
        own: Rank 0's own layers' slot state, between its first and last layer.
        busy_since: When rank 0's current compute stretch began (``perf.StepTimer``).
        in_layers: Whether that stretch is rank 0's own decoder layers.
    """

    reply: bool = True
    keep: int = 0
    collect: bool = False
    pending: dict[int, dict] = field(default_factory=dict)
    past_len: int = 0
    rewind: bool = False
    record: bool = False
    lane: int = 0
    use_cache: bool = False
    sentinels: set[int] = field(default_factory=set)
    states: list[torch.Tensor] | None = None
    own: OwnLayers | None = None
    busy_since: float | None = None
    in_layers: bool = False


def take_step(kwargs: dict, layer_idx: int) -> Step:
    """Take the step out of a decoder layer's keyword arguments (it must not travel further).

    Raises:
        StageError: if the layer was called without one: outside rank 0's model's forward, or by
            a family that does not pass its forward's keywords on to its layers.
    """
    step = kwargs.pop(KEYWORD, None)
    if step is None:
        raise StageError(f"decoder layer {layer_idx} on rank 0 ran outside a forward of the pipeline's model; call "
                         "pipe.model(...) or pipe.model.generate(...), not its inner modules")
    return step
