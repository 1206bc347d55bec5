"""pirope ops in deployment and training graphs beyond torch.compile: torch.export (static and
dynamic shapes, after run_decompositions, packed sequences) and compiled autograd (the backward
traced by torch._dynamo.compiled_autograd), each against eager."""

import pytest
import torch
from torch.export import Dim, export

import pirope
from attention_inputs import tables


class Block(torch.nn.Module):
    """A projection, the rotary ops and the fused attention (window, cap and sinks too)."""

    def __init__(self, head_dim=16, positions=64):
        super().__init__()
        cos, sin = tables(head_dim, positions)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)
        self.proj = torch.nn.Linear(head_dim, head_dim)
        self.sinks = torch.nn.Parameter(torch.randn(4))

    def forward(self, q, k, v, position_ids):
        qr, kr = pirope.apply_rope_qk(self.proj(q), k, self.cos, self.sin, position_ids)
        out = pirope.rope_attention(qr, kr, v, self.cos, self.sin, position_ids, window_size=(4, 0),
                                    softcap=3.0, sinks=self.sinks)
        return out + pirope.apply_rope(v, self.cos, self.sin, position_ids).mean()


def block_inputs(batch, seqlen):
    g = torch.Generator().manual_seed(batch * 100 + seqlen)
    return (torch.randn(batch, seqlen, 4, 16, generator=g), torch.randn(batch, seqlen, 2, 16, generator=g),
            torch.randn(batch, seqlen, 2, 16, generator=g), torch.randint(0, 64, (batch, seqlen), generator=g))


@pytest.mark.parametrize("dynamic", [False, True])
def test_export_equals_eager(dynamic):
    model = Block()
    args = block_inputs(2, 9)
    shapes = None
    if dynamic:
        batch, seqlen = Dim("batch", min=1, max=8), Dim("seqlen", min=2, max=64)
        shapes = {name: {0: batch, 1: seqlen} for name in ("q", "k", "v", "position_ids")}
    program = export(model, args, dynamic_shapes=shapes)
    assert any("pirope" in str(n.target) for n in program.graph.nodes if n.op == "call_function")
    calls = [args] + ([block_inputs(3, 13)] if dynamic else [])
    for exported in (program, program.run_decompositions()):
        for inputs in calls:
            torch.testing.assert_close(exported.module()(*inputs), model(*inputs), rtol=0, atol=0)


def test_export_of_packed_sequences():
    cos, sin = tables(16, 16)

    class Packed(torch.nn.Module):
        def forward(self, q, k, v, cu_seqlens):
            return pirope.rope_attention(q, k, v, cos, sin, cu_seqlens=cu_seqlens)

    total, seqs = Dim("total"), Dim("seqs_plus_1")
    program = export(Packed(), (torch.randn(10, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16),
                                torch.tensor([0, 4, 10])),
                     dynamic_shapes={"q": {0: total}, "k": {0: total}, "v": {0: total}, "cu_seqlens": {0: seqs}})
    args = (torch.randn(12, 4, 16), torch.randn(12, 2, 16), torch.randn(12, 2, 16), torch.tensor([0, 1, 5, 12]))
    torch.testing.assert_close(program.module()(*args), Packed()(*args), rtol=0, atol=0)


def test_backward_under_compiled_autograd_equals_eager():
    from torch._dynamo import compiled_autograd
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = Block().double()
    args = [t.double() if t.is_floating_point() else t for t in block_inputs(2, 9)]
    q = args[0].requires_grad_()

    def grads():
        model.zero_grad()
        q.grad = None
        model(*args).square().sum().backward()
        return [q.grad] + [p.grad for p in model.parameters()]

    want = grads()
    # eager forward, the backward (C++ autograd nodes of every op) traced and compiled
    with compiled_autograd._enable(torch.compile(backend="eager")):
        got = grads()
    assert counters["compiled_autograd"]["captures"] == 1
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
