"""What differs between architectures, in one place: the layout, KV-cache sizing, checkpoint keys.

torch_pp runs any causal LM whose transformers forward is embedding -> ``model.layers`` -> norm ->
head: rank 0 runs the model's own forward (so embedding scaling, logit soft-capping, sliding
windows and per-layer attention types are transformers' own), and the other stages run their
decoder layers on the arguments rank 0's forward gave them. What still differs between families
is answered here, by behaviour rather than by model_type:

* ``LAYOUT``: the attribute names of that one layout;
* ``kv_elems_per_token``/``kv_window``: how a layer's KV cache is sized (MLA caches a compressed
  latent; sliding-window layers keep at most the window);
* ``routed_fraction``: which share of a MoE layer's experts a token multiplies (compute plan);
* ``conversions``: how checkpoint keys become the model's parameters: transformers' own
  conversion mapping (fused MoE experts, renamed keys), applied per stage by ``model.loading``;
* ``REFUSALS``: the few kinds of model we refuse, each with its reason, checked on the config
  before any weight is read.

``FAMILIES`` lists the families tested to match single-process transformers through several
stages (docs/architectures.md's list is checked against it); any other model_type that fits the layout runs
too, and ``tests/test_arch_sweep.py`` checks every causal LM of the installed transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import ModelFolderError


@dataclass(frozen=True)
class Layout:
    """Where a causal LM keeps its parts: decoder layers at ``<base>.<layers>[i]``, the head at ``<head>``.

    Everything else (embedding, final norm whatever its name, rotary tables, ...) is rank 0's and
    used only by the model's own forward, so its names do not matter.
    """

    base: str = "model"
    layers: str = "layers"
    head: str = "lm_head"

    def missing(self, model) -> list[str]:
        """The parts ``model`` lacks (empty: it fits)."""
        inner = getattr(model, self.base, None)
        if inner is None:
            return [self.base]
        from torch import nn  # here, not above: the command line imports this module before torch

        gone = [] if isinstance(getattr(inner, self.layers, None), nn.ModuleList) else [f"{self.base}.{self.layers}"]
        return gone + ([self.head] if not hasattr(model, self.head) else [])

    def layer_list(self, model):
        return getattr(getattr(model, self.base), self.layers)


LAYOUT = Layout()


@dataclass(frozen=True)
class Family:
    """A group of model_types that run the same way, tested through 2 and 3 stages.

    Attributes:
        name: What docs/architectures.md calls it.
        model_types: The members tested against single-process transformers.
        note: What is special about it, if anything.
    """

    name: str
    model_types: tuple[str, ...]
    note: str = ""


FAMILIES = (
    Family("Llama-style dense", ("llama", "mistral", "qwen2", "qwen3", "phi3"),
           "sliding windows and per-layer attention types as transformers computes them"),
    Family("Gemma", ("gemma", "gemma2", "gemma3_text"), "embedding scaling, soft-capping, local/global layers"),
    Family("Mixture of experts", ("mixtral", "qwen2_moe", "qwen3_moe"),
           "checkpoint experts fused by transformers' conversion, per stage; the compute plan counts active experts"),
    Family("Multi-head latent attention", ("deepseek_v3",), "MoE; the KV cache holds the compressed latent"),
)


@dataclass(frozen=True)
class Refusal:
    """A kind of model torch_pp refuses, by behaviour, with the reason.

    Attributes:
        what: The kind, as the message names it.
        reason: Why it cannot run as pipeline stages.
        applies: Whether a config (a ``transformers.PretrainedConfig``) is of this kind.
    """

    what: str
    reason: str
    applies: Callable[[object], bool]


_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
_CACHELESS_LAYER_TYPES = {"moe", "mlp"}  # layers without attention: transformers gives them no cache


def _special_state(config) -> list[str]:
    """Layer kinds of ``config`` whose state is not a plain key/value cache (empty: none)."""
    types = sorted(set(getattr(config, "layer_types", None) or ()) - _ATTENTION_LAYER_TYPES - _CACHELESS_LAYER_TYPES)
    return types + [k for k in ("mamba_d_state", "ssm_state_size", "mamba_expand") if hasattr(config, k)]


def _looped(config) -> bool:
    return any((getattr(config, k, None) or 0) > 1 for k in ("n_recurrent_loops", "num_loops", "recurrent_loops"))


def _multimodal(config) -> bool:
    return any(getattr(config, k, None) is not None for k in ("vision_config", "audio_config", "text_config"))


REFUSALS = (
    Refusal("a model with layers whose state is not a key/value cache",
            "recurrent, linear-attention, convolution and compressed-attention layers keep a state that the "
            "stages cannot split and keep per sequence as they do key/value caches",
            lambda config: bool(_special_state(config))),
    Refusal("a model that runs its layers more than once per token",
            "looped depth runs the same layers several times per token, while each stage runs its own layers "
            "once, in order", _looped),
    Refusal("a multimodal model", "only the text decoder of a model is pipelined; load its text-only model_type "
            "(e.g. gemma3_text) or convert the checkpoint", _multimodal),
)


def refusal(config) -> Refusal | None:
    """The refusal that applies to ``config``, if any."""
    return next((r for r in REFUSALS if r.applies(config)), None)


def check_config(config, *, where: str) -> None:
    """Refuse, by name and with the reason, a model torch_pp cannot run, before any weight is read.

    Raises:
        ModelFolderError: naming the model_type, the kind of model and the reason.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.model_type
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelFolderError(f"model_type {model_type!r} in {where} is not a causal language model in the installed "
                               "transformers: torch_pp runs decoder-only models that AutoModelForCausalLM loads")
    found = refusal(config)
    if found is not None:
        detail = f" ({', '.join(_special_state(config))})" if _special_state(config) else ""
        raise ModelFolderError(f"model_type {model_type!r} in {where} is {found.what}{detail}, which torch_pp cannot "
                               f"run: {found.reason}")


def check_layout(model, *, model_type: str) -> None:
    """Refuse a model (a meta-device skeleton) whose parts are not where the layout expects them.

    Raises:
        ModelFolderError: naming the model_type and the missing parts.
    """
    missing = LAYOUT.missing(model)
    if missing:
        raise ModelFolderError(
            f"model_type {model_type!r} ({type(model).__name__}) has no {', '.join(missing)}: torch_pp splits models "
            f"whose decoder layers are {LAYOUT.base}.{LAYOUT.layers} and whose head is {LAYOUT.head}"
        )


# -- sizing --------------------------------------------------------------------------


def kv_elems_per_token(config, layer: int = 0) -> int:
    """Cached elements per token in ``layer`` (0 for a layer without attention)."""
    types = getattr(config, "layer_types", None)
    if types is not None and types[layer] in _CACHELESS_LAYER_TYPES:
        return 0
    if getattr(config, "kv_lora_rank", None):  # MLA caches the compressed latent and the rope key
        return int(config.kv_lora_rank + config.qk_rope_head_dim)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * heads * head_dim


def kv_window(config, layer: int) -> int | None:
    """The tokens ``layer`` keeps at most (None: every token), as transformers' cache decides
    (``cache_utils.get_layer_types_and_kwargs``)."""
    window, chunk = getattr(config, "sliding_window", None), getattr(config, "attention_chunk_size", None)
    types = getattr(config, "layer_types", None)
    kind = types[layer] if types is not None else (
        "sliding_attention" if window is not None else "chunked_attention" if chunk is not None else "full_attention")
    if kind == "sliding_attention" and window:
        return int(window)
    if kind == "chunked_attention" and chunk:
        return int(chunk)
    return None


def routed_fraction(config) -> float:
    """The share of a MoE layer's routed experts one token multiplies (1.0 for dense models)."""
    experts = next((getattr(config, k) for k in ("n_routed_experts", "num_local_experts", "num_experts")
                    if getattr(config, k, None)), None)
    per_token = getattr(config, "num_experts_per_tok", None)
    return per_token / experts if experts and per_token else 1.0


def is_routed_expert(param_name: str) -> bool:
    """Whether a parameter belongs to a layer's routed experts (not its shared ones)."""
    return ".experts." in param_name and ".shared_expert" not in param_name


# -- checkpoint keys -------------------------------------------------------------------


def conversions(model) -> tuple[list, list]:
    """transformers' own checkpoint conversion for ``model``: ``(renamings, converters)``.

    The same mapping ``from_pretrained`` applies (``transformers.conversion_mapping``): renamed keys,
    per-expert tensors fused into one, and so on.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    transforms = get_model_conversion_mapping(model)
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])
