"""Per-layer outputs on rank 0 when some layers run on other stages.

transformers records ``output_hidden_states`` with hooks on its decoder-layer class; the
placeholders for remote layers are not that class, so rank 0's own record holds only the
embeddings, its own layers and the final (normed) state. The stages send their layers'
outputs back when asked (a ``rank0.step.Step`` with ``collect``), and ``merge_hidden_states`` puts
them in their places. Attention weights would need every stage to run eager attention and
ship ``[B, heads, S, S]`` per layer: they are refused with a clear error instead.
"""

from __future__ import annotations

import torch

from .stage import StageError


def wants(model, kwargs: dict, name: str):
    """The value of ``output_<name>`` for this call: the keyword, else the model config's."""
    value = kwargs.get(f"output_{name}")
    return value if value is not None else getattr(model.config, f"output_{name}", False)


def refuse_attentions(model, kwargs: dict) -> None:
    """Raise StageError for ``output_attentions``: other stages' attention weights do not travel."""
    if wants(model, kwargs, "attentions"):
        raise StageError(
            "output_attentions is not supported by torch_pp: the attention weights of the layers on other "
            "stages stay there. Run the model in one process (transformers) to inspect attentions"
        )


def merge_hidden_states(recorded: tuple, remote: list[torch.Tensor], *, local_layers: int, num_layers: int,
                        selection) -> tuple:
    """transformers' ``hidden_states`` tuple for the whole model.

    Args:
        recorded: What transformers recorded on rank 0 with ``output_hidden_states=True``: the
            embeddings, rank 0's layers (and, in some versions, the placeholders' pass-through
            inputs), the last entry replaced by the final normed state.
        remote: ``[input of the remote span, output of each remote layer...]``.
        local_layers: Decoder layers on rank 0.
        num_layers: Decoder layers in the model.
        selection: The caller's ``output_hidden_states``: True, or index(es) to keep (others None).

    Raises:
        StageError: if transformers recorded a shape this function does not know.
    """
    if len(recorded) not in (local_layers + 1, num_layers + 1) or len(remote) != num_layers - local_layers + 1:
        raise StageError(
            f"output_hidden_states: transformers recorded {len(recorded)} states and the stages sent {len(remote)}; "
            "this transformers version records them in a way torch_pp does not know"
        )
    # recorded[:local_layers]: embeddings + rank 0's layers but its last; remote[0] is that last
    # layer's output; remote[-1] (the last layer's raw output) gives way to the normed state.
    states = [*recorded[:local_layers], *remote[:-1], recorded[-1]]
    if selection is True:
        return tuple(states)
    picked = [selection] if isinstance(selection, int) else list(selection)
    n = len(states)
    keep = {i % n for i in picked if -n <= i < n}
    return tuple(s if i in keep else None for i, s in enumerate(states))
