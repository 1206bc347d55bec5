"""A model's RoPE configuration: reading and validating ``rope_parameters`` / ``rope_scaling``,
the scaling a patched model writes back to its config (Position Interpolation, a replaced
scaling), in forms transformers loads back as the same model."""

from __future__ import annotations

import math
import numbers
import sys

from pirope.scaling import normalize_scaling

from .families import _Family
from .layout import _head_dim


# Families whose config class accepts only rope_type "default" or "longrope" (transformers'
# Phi3Config rejects "linear"): Position Interpolation is written there as the LongRoPE
# scaling it is a special case of (see _linear_as_longrope).
_LONGROPE_ONLY = ("phi3",)


def _rope_parameters_by_type(config, linear_layers: str | None = None) -> dict[str, dict]:
    """``{layer_type: rope_parameters}`` of a family with RoPE per layer type, for the layer
    types the model has (``set(config.layer_types)``, as its rotary embedding builds them), but
    its layers without attention (_Family.linear_layers: LFM3's "conv", which have no RoPE)."""
    params = getattr(config, "rope_parameters", None)
    layer_types = sorted(set(getattr(config, "layer_types", None) or ()) - {linear_layers})
    if not layer_types or not isinstance(params, dict):
        raise ValueError(
            "model.config must have layer_types and rope_parameters keyed by layer type such as "
            "{'full_attention': {'rope_type': 'default', 'rope_theta': 1e6}, 'sliding_attention': {...}}, "
            f"got layer_types={getattr(config, 'layer_types', None)!r}, rope_parameters={params!r}")
    return {t: _checked_rope_dict(params.get(t), f"model.config.rope_parameters[{t!r}]") for t in layer_types}


def _rope_parameters(config) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
    return _checked_rope_dict(params, "model.config.rope_parameters",
                              " (this model_type has one RoPE for all layers, not one per layer type)")


def _checked_rope_dict(params, where: str, note: str = "") -> dict:
    """A copy of one RoPE parameter dict (transformers 5 ``rope_parameters`` form), or a
    ValueError naming ``where`` (e.g. a per-layer-type dict where one dict was expected)."""
    if not isinstance(params, dict) or not ({"rope_type", "type", "rope_theta"} & set(params)):
        raise ValueError(
            f"{where} must be one dict in transformers 5 form such as "
            f"{{'rope_type': 'default', 'rope_theta': 10000.0}}{note}, got {params!r}")
    return dict(params)


# rope_parameters keys that a family with _Family.attn_temperature reads for its attention
_TEMPERATURE_KEYS = ("llama_4_scaling_beta", "original_max_position_embeddings", "max_position_embeddings")


# rope_parameters keys of a family with _Family.mrope: its sections, read by its rotary embedding's
# recomposition_frequencies (pirope reads the pairs' sections from that), not by the table
_MROPE_KEYS = ("mrope_section", "mrope_interleaved")


# the rope types whose tables read original_max_position_embeddings
_WINDOWED_ROPE_TYPES = ("yarn", "llama3", "longrope")


def _rope_setup(model, model_type: str, family: _Family, params: dict, head_dim: int):
    """(head_dim, base, scaling-for-pirope, partial_rotary_factor) of a model's RoPE."""
    partial_supported = family.partial
    given, params = params, dict(params)
    rope_type = params.pop("rope_type", params.pop("type", "default"))  # (both popped: "type" is its alias)
    if family.attn_temperature:  # the attention's keys, not the table's
        for key in _TEMPERATURE_KEYS:
            if key != "original_max_position_embeddings" or rope_type not in _WINDOWED_ROPE_TYPES:
                params.pop(key, None)
    if family.mrope:
        for key in _MROPE_KEYS:
            params.pop(key, None)
    base = params.pop("rope_theta", None)
    if base is None:
        base = getattr(model.config, "rope_theta", 10000.0)
    partial = params.pop("partial_rotary_factor", None)
    if partial is None and family.default_partial is not None:  # MiMo-V2-Flash: the type's dict only
        partial = family.default_partial if rope_type == "default" else 1.0
        config_partial = getattr(model.config, "partial_rotary_factor", None)
        if config_partial is not None and config_partial != partial:
            # its "default" table ignores the config's, while its scaled types' init (standardize_rope_params)
            # copies it into every type's dict without one: which share rotates depends on what ran first
            raise ValueError(
                f"model: config.partial_rotary_factor={config_partial!r} beside rope_parameters without one "
                f"({given!r}): model_type {model_type!r} rotates {partial} of the head with that dict, the config's "
                "share once another rope_type's table was built; put partial_rotary_factor in each layer type's "
                "rope_parameters")
    elif partial is None:
        partial = getattr(model.config, "partial_rotary_factor", None) or 1.0
    if partial != 1.0 and not partial_supported and rope_type != "proportional":
        # (proportional's table spans the whole head, partial_rotary_factor zeroing its last
        # pairs' frequencies: rotated as plain RoPE; _rotary_embedding refuses it where the
        # attention rotates a fixed part of the head)
        if rope_type == "default":
            # e.g. LlamaRotaryEmbedding's default init ignores partial_rotary_factor
            partial = 1.0
        else:
            raise ValueError(
                f"model: config partial_rotary_factor={partial} is not supported by model_type "
                f"{model_type!r} (transformers' {model_type} rotates the whole head)")
    if rope_type == "dynamic":
        # transformers' dynamic NTK always uses config.max_position_embeddings as the window
        params.pop("original_max_position_embeddings", None)
    scaling = None if rope_type == "default" else {"rope_type": rope_type, **params}
    return head_dim, base, scaling, partial


def _interpolation_factor(params: dict) -> float | None:
    """The Position Interpolation factor of a model's RoPE (1.0 for plain RoPE), or None
    when its scaling is not PI. PI written as LongRoPE (_linear_as_longrope: one factor
    for every pair, short and long, attention_factor 1) counts as PI, and so does
    "proportional" (Gemma 4's), whose factor divides the frequencies of the pairs it rotates."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return 1.0
    if rope_type in ("linear", "proportional"):  # proportional: PI of the pairs that rotate (Gemma 4)
        return float(params.get("factor", 1.0))
    if rope_type == "longrope":
        short, long = params.get("short_factor"), params.get("long_factor")
        if (isinstance(short, list) and short and short == long and all(x == short[0] for x in short)
                and params.get("attention_factor") == 1.0):
            return float(short[0])
    return None


def _linear_as_longrope(config, params: dict, head_dim: int, linear: dict, old_window: int) -> dict:
    """PI by ``linear["factor"]`` as rope_parameters a config that accepts only LongRoPE
    can hold: LongRoPE divides inverse frequency i by its ``short_factor[i]`` (sequences
    within ``original_max_position_embeddings``) or ``long_factor[i]`` (beyond), so one
    factor F for every pair of both lists is PI by F at every length; attention_factor 1
    keeps cos/sin unscaled (LongRoPE's default would scale them). The frequencies are
    1 / (F * base^(2i/d)) instead of linear's (1 / base^(2i/d)) / F: equal up to float32
    rounding. ``params``: the config's rope_parameters before."""
    partial = linear.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0)
    pairs = int(head_dim * partial) // 2
    factor = linear["factor"]
    original = (params.get("original_max_position_embeddings")
                or getattr(config, "original_max_position_embeddings", None) or old_window)
    out = {"rope_type": "longrope", "rope_theta": linear["rope_theta"], "factor": factor,
           "short_factor": [factor] * pairs, "long_factor": [factor] * pairs, "attention_factor": 1.0,
           "original_max_position_embeddings": original}
    if "partial_rotary_factor" in linear:
        out["partial_rotary_factor"] = linear["partial_rotary_factor"]
    return out


def _replaced_rope_parameters(model_type: str, family: _Family, config, attns, params: dict, scaling: dict) -> dict:
    """The rope_parameters ``scaling`` (Hugging Face form) gives a model whose current ones
    are ``params``: validated, keeping rope_theta (and partial_rotary_factor where the
    architecture has one) unless ``scaling`` has its own."""
    alpha = None
    if family.ntk_alpha and isinstance(scaling, dict) and "alpha" in scaling:  # Hunyuan's NTK-alpha, kept as given
        scaling = dict(scaling)
        alpha = scaling.pop("alpha")
    given = {}
    if family.attn_temperature and isinstance(scaling, dict):  # the attention's keys, given beside the table's
        scaling, given = _temperature_keys(scaling)
    new = normalize_scaling(scaling)  # validates (raises ValueError/TypeError naming the key); a dict here
    new.update(given)
    if alpha is not None:
        new["alpha"] = alpha
        _ntk_alpha_as_default(config, family, new, _head_dim(attns[0], family))  # validates alpha
    # transformers' families other than phi3 ignore partial_rotary_factor for plain RoPE and
    # fail with it otherwise: it is kept only where the architecture rotates part of a head, or
    # for "proportional", which reads it as the share of the head's pairs that rotate (Gemma 4)
    keep = (("rope_theta", "partial_rotary_factor") if family.partial or new["rope_type"] == "proportional"
            else ("rope_theta",))
    if family.attn_temperature:  # the attention's own keys (before the window's default below)
        keep += _TEMPERATURE_KEYS
    if family.mrope:  # the sections: transformers' rotary embedding reads them from here
        keep += _MROPE_KEYS
    for key in keep:
        if key not in new and key in params:
            new[key] = params[key]
    if family.default_partial is not None and "partial_rotary_factor" not in new:
        # MiMo-V2-Flash: the share of the head the model rotates now, written out (where the dict has none,
        # "default" and the scaled rope types read different defaults)
        old_type = params.get("rope_type", params.get("type", "default"))
        new["partial_rotary_factor"] = family.default_partial if old_type == "default" else 1.0
    if new["rope_type"] in ("llama3", "yarn", "longrope"):
        # as transformers' standardize_rope_params: a config's own original window (Phi-3 keeps
        # original_max_position_embeddings beside rope_parameters) is the one the model uses
        original = getattr(config, "original_max_position_embeddings", None)
        if original is None:
            new.setdefault("original_max_position_embeddings", config.max_position_embeddings)
        elif new.setdefault("original_max_position_embeddings", original) != original:
            raise ValueError(
                f"scaling: original_max_position_embeddings {new['original_max_position_embeddings']!r} differs from "
                f"model.config.original_max_position_embeddings ({original}), which transformers uses for this model "
                "instead: leave it out or pass the config's")
    if model_type in _LONGROPE_ONLY and new["rope_type"] not in ("default", "longrope"):
        if new["rope_type"] != "linear":
            raise ValueError(
                f"scaling: model_type {model_type!r} (transformers' config class) accepts only rope_type "
                f"'default' or 'longrope' ('linear' is written as the equal LongRoPE), got {new['rope_type']!r}")
        new.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
        new = _linear_as_longrope(config, params, _head_dim(attns[0], family), new, config.max_position_embeddings)
    return new


def _temperature_keys(scaling: dict) -> tuple[dict, dict]:
    """(the table's keys, the attention temperature's keys) of a ``scaling`` dict for a family with
    _Family.attn_temperature (Ministral 3, Mistral 4), so that a checkpoint's rope_parameters with a
    new factor can be passed as they are: ``llama_4_scaling_beta`` (a real number) and the window
    keys (ints >= 1), original_max_position_embeddings staying with the table where its rope_type
    reads it."""
    table, given = dict(scaling), {}
    rope_type = table.get("rope_type", table.get("type", "default"))
    for key in _TEMPERATURE_KEYS:
        if key not in table or (key == "original_max_position_embeddings" and rope_type in _WINDOWED_ROPE_TYPES):
            continue
        value = table.pop(key)
        if key == "llama_4_scaling_beta":
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"scaling['{key}'] (the attention temperature's) must be a finite real number, got "
                                f"{type(value).__name__} {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"scaling['{key}'] (the attention temperature's) must be a finite real number, got "
                                 f"{value!r}")
            given[key] = float(value)
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"scaling['{key}'] (the attention temperature's window) must be an int >= 1, got "
                            f"{type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"scaling['{key}'] (the attention temperature's window) must be an int >= 1, got {value}")
        given[key] = int(value)
    return table, given


def _ntk_alpha_as_default(config, family: _Family, params: dict, head_dim: int) -> dict:
    """``params`` as the RoPE it means for a family with ``ntk_alpha`` (Hunyuan): its rotary
    embedding turns rope_type "dynamic" with a truthy ``alpha`` into "ntk_alpha", static plain
    RoPE with base ``rope_theta * alpha ** (head_dim / (head_dim - 2))`` (computed as
    ``compute_ntk_alpha_rope_parameters`` does, in Python floats, so the table is the same), the
    dict's other keys (its checkpoints' factor 1.0, beta_fast, mscale, ...) unused; with any other
    rope_type (or a falsy alpha) ``alpha`` is ignored. Other families' params are returned as
    they are."""
    if not family.ntk_alpha or "alpha" not in params:
        return params
    params = dict(params)
    alpha = params.pop("alpha")
    if params.get("rope_type", params.get("type", "default")) != "dynamic" or not alpha:
        return params
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"rope_parameters['alpha'] (NTK-alpha RoPE) must be a real number, got "
                        f"{type(alpha).__name__} {alpha!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"rope_parameters['alpha'] (NTK-alpha RoPE) must be a finite number > 0, got {alpha!r}")
    theta = params.get("rope_theta")
    if theta is None:
        theta = getattr(config, "rope_theta", 10000.0)
    return {"rope_type": "default", "rope_theta": theta * alpha ** (head_dim / (head_dim - 2))}


def _mla_scaling(attn, params: dict) -> float:
    """The softmax scale an MLA attention module of transformers builds for rope_parameters ``params``:
    qk_head_dim ** -0.5, times yarn_get_mscale(factor, mscale_all_dim) ** 2 for a scaled RoPE with
    mscale_all_dim (DeepSeek's YaRN), computed by transformers' own yarn_apply_mscale."""
    import transformers
    from transformers import modeling_rope_utils

    apply = getattr(sys.modules[type(attn).__module__], "yarn_apply_mscale", None) or \
        getattr(modeling_rope_utils, "yarn_apply_mscale", None)
    if apply is None:
        raise TypeError(f"model: transformers {transformers.__version__} has no yarn_apply_mscale telling the "
                        f"softmax scale of {type(attn).__name__} under a new RoPE scaling; this version is not "
                        "supported")
    return apply(params, attn.qk_head_dim ** -0.5)


def _interpolated(config, params: dict, factor: float, where: str) -> dict:
    """Linear rope_parameters extending ``params`` (default or linear) by ``factor``; for
    "proportional" ones (Gemma 4's) proportional ones with the composed factor, the same pairs
    rotating (its partial_rotary_factor kept): no linear dict describes that table."""
    old_factor = _interpolation_factor(params)
    if old_factor is None:
        # (a Llama 3.x, YaRN or LongRoPE checkpoint: say how to extend it instead; a recipe where the
        # factor is over a fixed original window: yarn, llama3; not dynamic NTK, whose threshold is
        # max_position_embeddings itself, nor LongRoPE, whose per-pair factors a larger factor key
        # would not change)
        how = "its own scaling with new parameters through patch_rope"
        if (params.get("rope_type") in ("yarn", "llama3") and isinstance(params.get("factor"), numbers.Real)
                and where == "config.rope_parameters"):
            # (get_text_config(): the config itself, or a multimodal model's text config, which holds them)
            new_factor = float(params["factor"] * factor)
            how += (f", e.g. its factor times {float(factor)!r}: patch_rope(model, "
                    f"{{**model.config.get_text_config().rope_parameters, 'factor': {new_factor!r}}}), "
                    "then model.config.get_text_config().max_position_embeddings set to the new window")
        raise ValueError(
            f"model: Position Interpolation needs a model with rope_type 'default', 'linear' or 'proportional', "
            f"this one has {where}={params!r}; PI on top of rope_type {params.get('rope_type')!r} is not "
            f"defined: extend it by {how} (README: Drop-in recipes)")
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if params.get("rope_type") == "proportional":
        return {**params, "factor": old_factor * factor, "rope_theta": theta}
    return {"rope_type": "linear", "factor": old_factor * factor, "rope_theta": theta}


def _interpolated_by_type(config, factor: float, linear_layers: str | None = None) -> dict:
    """PI of a model with RoPE per layer type: the full_attention layers' RoPE extended by
    ``factor`` (composing with a linear factor they have), the others' left as they are."""
    by_type = _rope_parameters_by_type(config, linear_layers)
    if "full_attention" not in by_type:
        raise ValueError(
            "model: Position Interpolation extends the RoPE of the full_attention layers, and this model has "
            f"none (config.layer_types={config.layer_types!r})")
    for layer_type, params in by_type.items():
        # the other layer types keep their rope_parameters, and so must keep their tables when
        # the config's max_position_embeddings grows: only rope types that do not read it
        if layer_type != "full_attention" and _interpolation_factor(params) is None:
            raise ValueError(
                f"model: Position Interpolation leaves the {layer_type} layers' RoPE as it is, which needs their "
                "rope_type to be 'default', 'linear' or 'proportional' (tables independent of "
                f"max_position_embeddings); "
                f"config.rope_parameters[{layer_type!r}]={params!r}")
    return {"full_attention": _interpolated(config, by_type["full_attention"], factor,
                                            "config.rope_parameters['full_attention']")}
