"""Integrations of pirope with other libraries.

* :mod:`pirope.integrations.transformers` -- Hugging Face transformers: turn a
  LLaMA-family model into its Position-Interpolation-extended version
  (:func:`~pirope.integrations.transformers.apply_position_interpolation`) or route
  its RoPE, whatever its ``rope_type``, through pirope's ops
  (:func:`~pirope.integrations.transformers.patch_rope`).

The submodules import their library lazily (only when imported themselves), so
``import pirope`` never needs transformers.
"""

__all__ = ["transformers"]


def __getattr__(name):  # PEP 562: `pirope.integrations.transformers` on first use
    if name == "transformers":
        import importlib

        return importlib.import_module(f"{__name__}.transformers")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
