"""Fake kernels of the rotary ops: outputs are allocated like the real kernels do
(torch.empty_like of the input, which keeps a dense input's strides)."""

import torch


def _check_devices(op, first, *others):
    # A tensor on the meta device routes the whole call here: keep the real kernels'
    # device check so that mixing devices never passes silently.
    for name, t in others:
        if t is not None and t.device != first[1].device:
            raise RuntimeError(f"{op}: {name} must be on {first[1].device} like {first[0]}, got {t.device}")


@torch.library.register_fake("pirope::apply_rope")
def _apply_rope(x, cos, sin, position_ids, interleaved):
    _check_devices("apply_rope", ("x", x), ("cos", cos), ("sin", sin), ("position_ids", position_ids))
    return torch.empty_like(x)


@torch.library.register_fake("pirope::apply_rope_backward")
def _apply_rope_backward(grad, cos, sin, position_ids, interleaved):
    _check_devices("apply_rope_backward", ("grad", grad), ("cos", cos), ("sin", sin),
                   ("position_ids", position_ids))
    return torch.empty_like(grad)


@torch.library.register_fake("pirope::apply_rope_qk")
def _apply_rope_qk(q, k, cos, sin, position_ids, interleaved):
    _check_devices("apply_rope_qk", ("q", q), ("k", k), ("cos", cos), ("sin", sin),
                   ("position_ids", position_ids))
    return torch.empty_like(q), torch.empty_like(k)


@torch.library.register_fake("pirope::apply_rope_qk_backward")
def _apply_rope_qk_backward(grad_q, grad_k, cos, sin, position_ids, interleaved):
    _check_devices("apply_rope_qk_backward", ("grad_q", grad_q), ("grad_k", grad_k), ("cos", cos),
                   ("sin", sin), ("position_ids", position_ids))
    return torch.empty_like(grad_q), torch.empty_like(grad_k)


@torch.library.register_fake("pirope::apply_rope_")
def _apply_rope_(x, cos, sin, position_ids, interleaved):
    _check_devices("apply_rope_", ("x", x), ("cos", cos), ("sin", sin), ("position_ids", position_ids))
    return None


@torch.library.register_fake("pirope::apply_rope_qk_")
def _apply_rope_qk_(q, k, cos, sin, position_ids, interleaved):
    _check_devices("apply_rope_qk_", ("q", q), ("k", k), ("cos", cos), ("sin", sin),
                   ("position_ids", position_ids))
    return None
