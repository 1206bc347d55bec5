"""The public functions: :func:`patch_rope` and :func:`apply_position_interpolation`."""

from __future__ import annotations

import functools
import math
import numbers

from pirope.frequencies import PositionsMemo

from .attention import _pirope_attention_forward, _pirope_mla_attention_forward, _slice_kv_shared_inputs
from .layout import _attention_modules, _attention_modules_of_type, _base_model, _family, _head_dim, _language_model
from .rope_parameters import (_interpolated, _interpolated_by_type, _mla_scaling, _ntk_alpha_as_default,
                              _replaced_rope_parameters, _rope_parameters, _rope_parameters_by_type)

from .rotary import _rotary_embedding, _rotary_embeddings_per_theta, PiropeLayerTypeRotaryEmbedding


_ATTENTION_MODES = ("fused", "sdpa")


_MAX_WINDOW = 2**63 - 1  # a context window is an int64 position count


def _resolve_attention(attention) -> str:
    if not isinstance(attention, str) or attention not in _ATTENTION_MODES:
        raise ValueError(f"attention must be one of {', '.join(map(repr, _ATTENTION_MODES))}, got {attention!r}")
    return attention


def patch_rope(model, scaling: dict | None = None, *, attention: str = "sdpa"):
    """Routes a LLaMA-family model's RoPE (and optionally attention) through pirope's ops.

    Args:
        model: a transformers ``PreTrainedModel`` with ``config.model_type`` in
            :data:`SUPPORTED_MODEL_TYPES` (e.g. ``LlamaForCausalLM``, ``LlamaModel``,
            ``MistralForCausalLM``, ``Phi3ForCausalLM``), or a multimodal model whose
            language model is one (e.g. ``LlavaForConditionalGeneration``: its language
            model is patched, ``config`` below is then its ``text_config``). Modified in
            place.
        scaling: ``None`` keeps the model's own ``config.rope_parameters`` (any
            ``rope_type``). A dict in Hugging Face ``rope_parameters`` form replaces it
            -- in ``model.config`` too, so the config keeps describing the model (its
            ``rope_theta`` and ``partial_rotary_factor`` are kept unless the dict has
            its own). For a model with RoPE per layer type (Gemma 3, Gemma 4, OLMo 3) a dict
            keyed by layer type, e.g. ``{"full_attention": {"rope_type": "linear",
            "factor": 4.0}}``: each named type's parameters are replaced as above, the
            types not named keep theirs; a single ``rope_parameters`` dict raises
            ``ValueError`` (ambiguous, see the module docstring). Hunyuan's dicts may also
            hold ``alpha`` (NTK-alpha RoPE with "dynamic", ignored otherwise, as in
            transformers); Ministral 3's and Mistral 4's the attention temperature's keys
            (``llama_4_scaling_beta``, ``original_max_position_embeddings``,
            ``max_position_embeddings``), kept from the config where not given.
        attention: ``"sdpa"`` (pirope RoPE, then the model's own attention function) or
            ``"fused"`` (:func:`pirope.rope_attention` where exact, see the module
            docstring).

    Returns:
        ``model``. Its logits equal the unpatched model's (to float32 rounding of the
        angles) for every call the unpatched model supports.

    Raises:
        TypeError: ``model`` is not a supported transformers model, or ``scaling`` is not
            a dict (or has a value of the wrong type).
        ValueError: bad ``attention`` or ``scaling``, or a model none of whose layers has an
            attention with RoPE (a Qwen3-Next of linear-attention layers only).
    """
    whole, model = model, _language_model(model)
    model_type, family = _family(model)
    mode = _resolve_attention(attention)
    base, attns = _attention_modules(model, family)
    config = model.config
    if scaling is not None and not isinstance(scaling, dict):
        raise TypeError(
            f"scaling must be None or a dict in Hugging Face rope_parameters form, got {type(scaling).__name__}")
    mla_scales = per_theta = None
    if family.rope_per_layer_type:
        by_type = _rope_parameters_by_type(config, family.linear_layers)
        if scaling is not None:
            unknown = set(scaling) - set(by_type)
            if not scaling or unknown or not all(isinstance(v, dict) for v in scaling.values()):
                raise ValueError(
                    f"scaling: model_type {model_type!r} has RoPE parameters per layer type "
                    f"({', '.join(map(repr, by_type))}); pass a dict keyed by layer type, e.g. "
                    "{'full_attention': {'rope_type': 'linear', 'factor': 4.0}} (types not named keep their "
                    "RoPE), or use apply_position_interpolation (which extends the full_attention layers); "
                    f"got {scaling!r}")
            by_type = {t: _replaced_rope_parameters(model_type, family, config, attns, p, scaling[t])
                       if t in scaling else p for t, p in by_type.items()}
        rotary = PiropeLayerTypeRotaryEmbedding(
            {t: _rotary_embedding(model, model_type, family, _attention_modules_of_type(config, family, attns, t), p)
             for t, p in by_type.items()})
        if scaling is not None:
            config.rope_parameters = {**config.rope_parameters, **by_type}
    else:
        params = _rope_parameters(config)
        if scaling is not None:
            params = _replaced_rope_parameters(model_type, family, config, attns, params, scaling)
        rotary = _rotary_embedding(model, model_type, family, attns, params)
        if family.rotary_per_theta is not None:  # (GraniteSWA: its model's rotary_emb is unused)
            per_theta = _rotary_embeddings_per_theta(model, model_type, family, attns, params)
        if family.proj == "mla" and rotary.rotary_dim != attns[0].qk_rope_head_dim:
            raise ValueError(
                f"scaling: a RoPE table of {rotary.rotary_dim} features does not fit the {attns[0].qk_rope_head_dim} "
                f"rotary features (qk_rope_head_dim) of model_type {model_type!r}'s heads; rope_parameters "
                f"{params!r} (its partial_rotary_factor) must give them")
        # MLA's softmax scale holds YaRN's mscale_all_dim (transformers' yarn_apply_mscale at init)
        if family.proj == "mla" and scaling is not None:
            mla_scales = [_mla_scaling(attn, params) for attn in attns]
        if scaling is not None:
            config.rope_parameters = params
    setattr(base, family.rotary_name, rotary)
    if per_theta is not None:
        setattr(base, family.rotary_per_theta, per_theta)
    if family.kv_sharing and hasattr(type(base), "_maybe_slice_kv_shared_inputs"):
        base._maybe_slice_kv_shared_inputs = functools.partial(_slice_kv_shared_inputs, base)
    text_positions = PositionsMemo()  # mRoPE: the layers' text positions, read once per forward
    for attn in attns:
        attn._pirope_family = family
        attn._pirope_attention = mode
        if family.mrope or family.rope_layers is not None:  # (NoPE layers without tables: LaraMini's)
            attn._pirope_text_positions = text_positions
        # a partial of a module-level function pickles (torch.save(model), multiprocessing)
        # and deep-copies onto the copy; a bound MethodType would not unpickle
        forward = _pirope_mla_attention_forward if family.proj == "mla" else _pirope_attention_forward
        attn.forward = functools.partial(forward, attn)
    for attn, scale in zip(attns, mla_scales or ()):
        attn.scaling = scale
    return whole


def apply_position_interpolation(
    model,
    factor: float | None = None,
    *,
    max_position_embeddings: int | None = None,
    attention: str = "fused",
):
    """Extends a LLaMA-family model's context window by Position Interpolation.

    Position ``m`` of the extended model is rotated like position ``m / factor`` of the
    original one (Chen et al. 2023, rope_type ``"linear"``). The model is modified in
    place and returned:

    * ``model.config.rope_parameters`` becomes ``{"rope_type": "linear", "factor":
      F, "rope_theta": ...}`` (plus ``partial_rotary_factor`` if the config had one and
      the architecture rotates part of a head: Phi-3, GLM, GLM-4; the others rotate
      the whole head) and ``model.config.max_position_embeddings`` the new window, so
      ``save_pretrained`` / ``from_pretrained`` with plain transformers (no pirope)
      gives the same model. Phi-3, whose config class accepts no "linear", gets the
      same scaling as LongRoPE parameters instead: ``short_factor`` = ``long_factor``
      = ``[F] * (rotary_dim // 2)``, ``attention_factor`` 1 (frequencies equal to
      linear's up to float32 rounding);
    * RoPE, and with ``attention="fused"`` attention, run through pirope's ops (see
      :func:`patch_rope`); the output equals transformers' own linear-scaled model on
      the same weights.

    RoPE per layer type (Gemma 3, Gemma 4, OLMo 3). Only the full_attention layers are
    extended: ``config.rope_parameters["full_attention"]`` becomes linear with the (composed)
    factor, every other layer type keeps its parameters and tables -- sliding-window layers
    only ever see distances within their window, which PI does not change; this is what Gemma 3
    itself does for its 128k models (linear factor 8 on the global layers only, local ones
    untouched, as transformers' legacy ``rope_scaling`` is applied). Gemma 4's full_attention
    layers have "proportional" RoPE (a share of their pairs rotating): it stays "proportional",
    with the composed ``factor`` dividing the rotating pairs' frequencies (transformers computes
    with that key, though its config validation logs that it does not know it). The other layer
    types must have rope_type "default", "linear" or "proportional" (whose tables do not depend
    on ``max_position_embeddings``, which grows), and the model must have full_attention
    layers. The updated config reloads with plain transformers as the same model.

    NoPE global layers (EXAONE 4, Cohere 2 with a window): their one ``rope_parameters``
    is scaled as for any model, and only their sliding-window layers rotate, so PI changes
    those local layers only; the global layers have no position limit of RoPE's to extend.

    ``model.config`` is changed in place, as transformers' own config setters do: another
    model built from the same config object sees the new ``rope_parameters`` and window
    without being patched (pass ``copy.deepcopy(config)`` when building models that must
    stay apart).

    Composition. ``factor`` is relative to the model *as it is*: a model already
    extended by PI with factor ``s`` (``rope_type "linear"``, window ``L``) extended
    again by ``f`` gets ``factor = s * f`` in its config and window ``f * L`` -- the
    positions of the new model are divided by ``s * f`` relative to pretraining, which
    is what transformers' single linear ``factor`` means (it always divides the
    pretrained frequencies). Only models with ``rope_type`` "default" or "linear" (or
    "proportional", above) can be interpolated (PI on top of dynamic/yarn/llama3/longrope is
    not a defined scaling).

    Hunyuan's NTK-alpha RoPE (``hunyuan_v1_dense``/``hunyuan_v1_moe`` with ``rope_parameters``
    ``{"rope_type": "dynamic", "alpha": a, ...}``, as its checkpoints write it) is plain RoPE
    with the stretched base ``B = rope_theta * a ** (head_dim / (head_dim - 2))``, so it counts
    as "default" here: ``rope_parameters`` becomes ``{"rope_type": "linear", "factor": F,
    "rope_theta": B}`` (``alpha`` and the unused keys dropped), the same frequencies divided by
    ``F``, which transformers' Hunyuan rotary embedding builds from it (and reloads) exactly.

    Args:
        model: transformers ``PreTrainedModel`` with ``config.model_type`` in
            :data:`SUPPORTED_MODEL_TYPES`, or a multimodal model whose language model is
            one (``Gemma3ForConditionalGeneration``, LLaVA, ...): that language model is
            extended and ``config.text_config`` updated (``config`` above means it).
        factor: the scale ``s >= 1``: new window = ``s`` x the model's window
            (``config.max_position_embeddings``, rounded to an int).
        max_position_embeddings: alternatively, the new window (an int larger than the
            model's); ``factor = max_position_embeddings / config.max_position_embeddings``.
            Pass exactly one of ``factor`` and ``max_position_embeddings``.
        attention: ``"fused"`` (default: :func:`pirope.rope_attention` where exact, the
            "sdpa" path elsewhere) or
            ``"sdpa"`` (pirope RoPE + the model's own attention function).

    Returns:
        ``model``.

    Raises:
        TypeError: ``model`` is not a supported transformers model, or ``factor`` /
            ``max_position_embeddings`` has the wrong type.
        ValueError: both or neither of ``factor`` and ``max_position_embeddings``,
            ``factor < 1`` (``factor=1`` is accepted: linear scaling by 1, the window
            unchanged), ``max_position_embeddings`` not larger than the model's window,
            a model whose ``rope_type`` is not "default"/"linear" (or PI written as LongRoPE, as
            above; per layer type: the full_attention layers', and every type's must be
            "default"/"linear"/"proportional"), or an unknown ``attention``.
    """
    whole, model = model, _language_model(model)
    _, family = _family(model)  # TypeError for an unsupported model, before anything else
    _resolve_attention(attention)
    if (factor is None) == (max_position_embeddings is None):
        raise ValueError(
            "pass exactly one of factor (the scale, e.g. 4.0) and max_position_embeddings (the new window); "
            f"got factor={factor!r}, max_position_embeddings={max_position_embeddings!r}")
    config = model.config
    old_window = config.max_position_embeddings
    if factor is not None:
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            raise TypeError(f"factor must be a real number >= 1, got {type(factor).__name__} {factor!r}")
        factor = float(factor)
        if not math.isfinite(factor) or factor < 1:
            raise ValueError(
                f"factor must be a finite number >= 1 (Position Interpolation extends the window), got {factor}")
        new_window = old_window * factor
        if new_window > _MAX_WINDOW:
            raise ValueError(f"factor={factor} gives a window of {new_window:.3g} positions, past int64")
        new_window = int(round(new_window))
    else:
        if isinstance(max_position_embeddings, bool) or not isinstance(max_position_embeddings, numbers.Integral):
            raise TypeError(
                f"max_position_embeddings must be an int, got {type(max_position_embeddings).__name__} "
                f"{max_position_embeddings!r}")
        new_window = int(max_position_embeddings)
        if new_window > _MAX_WINDOW:
            raise ValueError(f"max_position_embeddings must fit in int64, got {new_window}")
        if new_window <= old_window:
            raise ValueError(
                f"max_position_embeddings={new_window} must be larger than the model's window "
                f"config.max_position_embeddings={old_window}")
        factor = new_window / old_window

    if family.rope_per_layer_type:
        new_params = _interpolated_by_type(config, factor, family.linear_layers)
    else:
        params = _rope_parameters(config)
        if family.ntk_alpha:  # Hunyuan's NTK-alpha RoPE is plain RoPE with a stretched base: PI on that
            _, attns = _attention_modules(model, family)
            params = _ntk_alpha_as_default(config, family, params, _head_dim(attns[0], family))
        new_params = _interpolated(config, params, factor, "config.rope_parameters")
    # patch_rope keeps the config's partial_rotary_factor where the architecture has one and
    # writes "linear" as LongRoPE where the config class accepts nothing else (Phi-3)

    patch_rope(model, new_params, attention=attention)  # validates everything before changing the model
    config.max_position_embeddings = new_window
    base = _base_model(model)
    getattr(base, family.rotary_name).max_position_embeddings = new_window
    for rotary in getattr(base, family.rotary_per_theta) if family.rotary_per_theta else ():
        rotary.max_position_embeddings = rotary.config.max_position_embeddings = new_window  # (its config copy's)
    return whole
