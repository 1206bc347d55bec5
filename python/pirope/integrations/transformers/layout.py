"""Finding a model's parts: its family, language model, decoder layers and attention modules,
checked against what the family needs before anything is changed."""

from __future__ import annotations

import torch
from torch import nn

from .families import _FAMILIES, _Family, _PROJECTIONS, SUPPORTED_MODEL_TYPES


def _family(model) -> tuple[str, _Family]:
    try:
        from transformers import PreTrainedModel
    except ImportError as e:  # pragma: no cover - transformers is what this module is for
        raise ImportError("pirope.integrations.transformers needs the transformers package") from e
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            "model must be a Hugging Face transformers PreTrainedModel of the LLaMA family "
            f"(model_type one of {', '.join(SUPPORTED_MODEL_TYPES)}), got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _FAMILIES:
        raise TypeError(
            f"model must be a LLaMA-family model (config.model_type one of {', '.join(SUPPORTED_MODEL_TYPES)}); "
            f"got {type(model).__name__} with model_type {model_type!r}")
    return model_type, _FAMILIES[model_type]


def _language_model(model):
    """What pirope patches: ``model`` itself for a supported ``model_type``; for a PEFT
    wrapper (``PeftModel``: not a ``PreTrainedModel``, with ``get_base_model()``) the
    transformers model it wraps; for a multimodal model (LLaVA, Gemma 3, Mistral 3,
    PaliGemma, ...) its language model when that is of a supported type and holds the
    model's own text config (the same object, so the config update reaches
    ``save_pretrained``). Anything else is returned as is, for :func:`_family` to refuse."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) and callable(getattr(model, "get_base_model", None)):
        inner = model.get_base_model()  # PEFT's LoRA layers replace q_proj etc. in place: patchable
        if isinstance(inner, PreTrainedModel):
            model = inner
    if not isinstance(model, PreTrainedModel) or getattr(model.config, "model_type", None) in _FAMILIES:
        return model
    text_config = model.config.get_text_config()
    inner = getattr(model, "model", None)
    # model.model.language_model (LLaVA, Gemma 3, Qwen2-VL, ...), model.language_model, or model.model
    # itself (the Omni thinkers of older transformers, 5.17 among them, hold their text model there)
    for lm in (getattr(inner, "language_model", None), getattr(model, "language_model", None), inner):
        if (isinstance(lm, PreTrainedModel) and lm.config is text_config
                and getattr(lm.config, "model_type", None) in _FAMILIES):
            return lm
    return model


def _base_model(model):
    base = model.base_model
    if base is model and not hasattr(base, "layers"):
        # Llama4ForCausalLM: base_model_prefix "language_model" names no attribute of it (base_model is
        # the model itself); its decoder is .model, as in every other ...ForCausalLM
        base = getattr(model, "model", base)
    family = _FAMILIES[model.config.model_type]
    rotary, layers = family.rotary_name, family.layers_name
    if not (hasattr(base, layers) and hasattr(base, rotary)):
        raise TypeError(
            f"model: could not find the decoder layers and {rotary} of {type(model).__name__} "
            f"(its base model {type(base).__name__} has no .{layers} / .{rotary})")
    if family.no_rope_flag is not None and getattr(model.config, family.no_rope_flag, False):
        # Falcon-RW: ALiBi biases in the mask, the rotary embedding built but unused
        raise TypeError(
            f"model: {type(model).__name__} has config.{family.no_rope_flag} set: its positions are not RoPE "
            f"(its {rotary} is unused); there is no RoPE to patch or interpolate")
    if getattr(base, rotary) is None:
        # configured without RoPE (Granite 4.0's position_embedding_type None, OLMo Hybrid's rope_theta None)
        raise TypeError(
            f"model: {type(model).__name__} has no rotary embedding ({type(base).__name__}.{rotary} is None: "
            "its config has no RoPE); there is no RoPE to patch or interpolate")
    return base


def _projections(family: _Family) -> tuple[str, ...]:
    """The names of an attention module's q, k, v projections (see _Family.proj, .q_gate)."""
    names = _PROJECTIONS[family.proj]
    return names if family.q_gate is None else (family.q_gate,) + names[1:]


def _attention_modules(model, family: _Family):
    base = _base_model(model)
    need = _projections(family) + (family.out_proj,)
    need += (family.out_dropout,) if family.out_dropout is not None else ()
    need += (family.out_norm,) if family.out_norm is not None else ()
    need += (family.gate,) if family.gate is not None else ()
    need += tuple(name for name in (family.v_head_dim, family.v_scale) if name is not None)  # MiMo-V2-Flash's
    need += ("layer_idx",) if family.chunked is not None else ()  # which config.layer_types entry is its
    # the window the family's attention passes (and where it rotates, AFMoE's, Flint's), read from the module
    need += ("sliding_window",) if family.window in ("module", "sliding") else ()
    need += ("is_sliding",) if family.window == "sliding" else ()  # (whether its window applies: EXAONE 4)
    modules = []
    layer_types = getattr(model.config, "layer_types", None) or ()
    cross_layers = (getattr(model.config, family.cross_layers, None) or ()) if family.cross_layers else ()
    decoder_layers = getattr(base, family.layers_name)
    layers = ((i, layer, attn) for i, layer in enumerate(decoder_layers) for attn in _attentions_of(layer, family))
    for i, layer, attn in layers:
        if family.linear_layers is not None and i < len(layer_types) and layer_types[i] == family.linear_layers \
                and attn is None:  # Qwen3-Next's linear-attention layers: no RoPE, left alone
            continue
        if attn is None and i in cross_layers:  # Mllama's cross-attention layers: no RoPE, left alone
            continue
        layer_need = need + (family.qk_norm_names if attn is not None and _qk_norm(attn, family) else ())
        layer_need += (family.v_norm,) if family.v_norm is not None else ()
        if family.proj == "mla":  # q from one projection, or from a low-rank pair with a norm between
            layer_need += (("q_proj",) if getattr(attn, "q_lora_rank", None) is None
                           else ("q_a_proj", "q_a_layernorm", "q_b_proj"))
            layer_need += ("mla_scale_q_lora", "mla_scale_kv_lora") if family.mla_lora_scales else ()
        if family.kv_sharing:
            if attn is None or not all(hasattr(attn, n) for n in _KV_SHARING_ATTRS):
                raise TypeError(
                    f"model: decoder layer {i} ({type(layer).__name__}) has no self_attn."
                    f"{', self_attn.'.join(_KV_SHARING_ATTRS)} (its KV sharing); this architecture is not supported")
            if _kv_shared(attn, family):  # q_proj and o_proj, and its q_norm, only
                layer_need = ("q_proj", family.out_proj) + family.qk_norm_names[:1]
        if (attn is None or not all(hasattr(attn, n) for n in layer_need)
                or not hasattr(attn, family.head_dim_attr)):
            raise TypeError(
                f"model: decoder layer {i} ({type(layer).__name__}) has no {family.attn_name} with "
                f"{', '.join(layer_need)} and {family.head_dim_attr}; this architecture is not supported"
                + ("" if family.since is None else
                   f" (pirope follows the {model.config.model_type} attention of transformers >= {family.since})"))
        if family.rope_layers is not None and not all(hasattr(attn, n) for n in family.rope_layers.needs):
            raise TypeError(
                f"model: decoder layer {i} ({type(layer).__name__}) has no self_attn."
                f"{', self_attn.'.join(family.rope_layers.needs)} telling whether it rotates; "
                "this architecture is not supported")
        if family.softcap is not None and not hasattr(attn, family.softcap):
            raise TypeError(
                f"model: decoder layer {i} ({type(layer).__name__}) has no self_attn.{family.softcap} "
                "(its attention-logit soft-cap); this architecture is not supported")
        sinks = getattr(attn, family.sinks, None) if family.sinks is not None else None
        if family.sinks is not None and not isinstance(sinks, torch.Tensor) and not (
                family.sinks_optional and sinks is None and hasattr(attn, family.sinks)):
            raise TypeError(
                f"model: decoder layer {i} ({type(layer).__name__}) has no tensor self_attn.{family.sinks} "
                f"(its attention-sink logits{', or None' if family.sinks_optional else ''}); "
                "this architecture is not supported")
        if family.nope_temperature and not all(hasattr(attn, n) for n in _NOPE_TEMPERATURE_ATTRS):
            raise TypeError(
                f"model: decoder layer {i} ({type(layer).__name__}) has no self_attn."
                f"{', self_attn.'.join(_NOPE_TEMPERATURE_ATTRS)} (its attention temperature tuning); "
                "this architecture is not supported")
        if family.indexer is not None and getattr(attn, family.indexer, None) is not None:
            raise TypeError(
                f"model: decoder layer {i} ({type(layer).__name__}) has a sparse-attention indexer "
                f"(self_attn.{family.indexer}, which reads the RoPE tables itself and selects the keys attended to); "
                "pirope does not follow it: this architecture is supported without such layers only")
        modules.append(attn)
    if not modules:  # Qwen3-Next with fewer layers than its full_attention_interval: all linear
        which = (f"config.{family.cross_layers} lists them all" if family.cross_layers
                 else f"config.layer_types are all {family.linear_layers!r}")
        raise ValueError(
            f"model: none of the {len(decoder_layers)} decoder layers of {type(model).__name__} has an attention "
            f"with RoPE ({which}): nothing for pirope to patch")
    return base, modules


def _attentions_of(layer, family: _Family) -> list:
    """A decoder layer's attention modules: its ``family.attn_name`` module (None where it has none), or
    each of a ModuleList of them (LongCat-Flash's two per layer, which it calls one after the other)."""
    attn = getattr(layer, family.attn_name, None)
    return list(attn) if isinstance(attn, nn.ModuleList) else [attn]


# what the attention module of a family with nope_temperature holds for it (Llama 4)
_NOPE_TEMPERATURE_ATTRS = ("attn_temperature_tuning", "floor_scale", "attn_scale")


# what the attention module of a family with kv_sharing tells about it (Gemma 4)
_KV_SHARING_ATTRS = ("is_kv_shared_layer", "store_full_length_kv", "layer_type")


def _kv_shared(attn, family: _Family) -> bool:
    """Whether this layer attends to keys and values an earlier layer stored (Gemma 4)."""
    return family.kv_sharing and bool(attn.is_kv_shared_layer)


def _qk_norm(attn, family: _Family) -> str | None:
    """Where this attention module normalizes q and k (see _Family.qk_norm; after RoPE with
    _Family.qk_norm_after_rope), None where it does not."""
    if family.qk_norm is None or (family.qk_norm_flag is not None and not getattr(attn, family.qk_norm_flag, False)):
        return None
    return family.qk_norm


def _head_dim(attn, family: _Family) -> int:
    return getattr(attn, family.head_dim_attr)


def _attention_modules_of_type(config, family: _Family, attns, layer_type: str):
    """The attention modules of the layers of one type (``config.layer_types``), whose head size
    is that of the type's table (Gemma 4's full_attention heads are larger than its sliding ones)."""
    # (attns: those of the layers with attention, LFM3's "conv" layers left out; layer_type one they have, as
    # _rope_parameters_by_type lists them, transformers checking that layer_types has an entry per layer)
    types = [t for t in config.layer_types if t != family.linear_layers]
    of_type = [attn for attn, t in zip(attns, types) if t == layer_type]
    sizes = sorted({_head_dim(attn, family) for attn in of_type})
    if len(sizes) > 1:
        raise TypeError(f"model: the {layer_type} layers have heads of different sizes {sizes} (one RoPE table per "
                        "layer type cannot serve them); this architecture is not supported")
    return of_type
