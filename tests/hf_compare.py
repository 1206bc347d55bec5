"""Comparing a pirope-patched Hugging Face model with transformers' own: the logits and
parameter gradients of one training step, and their tolerances."""

import torch


def logits_and_grads(model, input_ids, **inputs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids, labels=input_ids, use_cache=False, **inputs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def assert_same_logits(a, b):
    # float32 HF angles vs pirope's float64 ones: a few float32 ulps at these positions
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def assert_same_grads(ga, gb):
    assert ga.keys() == gb.keys()
    for name in ga:
        scale = gb[name].abs().max().item()
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-5, atol=1e-5 * max(scale, 1e-3), msg=name)
