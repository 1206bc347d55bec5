"""Determinism, thread safety and no leaks for the rotary ops."""

import gc
import threading

import torch

import pirope


def setup_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    inv_freq, _ = pirope.rope_frequencies(128, scaling={"rope_type": "linear", "factor": 4.0})
    cos, sin = pirope.rope_cos_sin(inv_freq, 512)
    q = torch.randn(2, 300, 8, 128, generator=g).bfloat16()
    k = torch.randn(2, 300, 2, 128, generator=g).bfloat16()
    return q, k, cos, sin


def test_repeated_calls_are_bit_identical():
    q, k, cos, sin = setup_case()
    first = pirope.apply_rope_qk(q, k, cos, sin)
    grads = []
    for _ in range(5):
        out = pirope.apply_rope_qk(q, k, cos, sin)
        assert torch.equal(out[0], first[0]) and torch.equal(out[1], first[1])
        qq, kk = q.float().requires_grad_(), k.float().requires_grad_()
        oq, ok = pirope.apply_rope_qk(qq, kk, cos, sin)
        (oq.square().sum() + ok.sum()).backward()
        grads.append((qq.grad, kk.grad))
    assert all(torch.equal(g[0], grads[0][0]) and torch.equal(g[1], grads[0][1]) for g in grads)


def test_threads_give_the_serial_results():
    cases = [setup_case(seed) for seed in range(8)]
    serial = [pirope.apply_rope_qk(*c) for c in cases]
    results = [None] * len(cases)

    def work(i):
        for _ in range(5):
            results[i] = pirope.apply_rope_qk(*cases[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (sq, sk), (rq, rk) in zip(serial, results):
        assert torch.equal(sq, rq) and torch.equal(sk, rk)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_ten_thousand_calls_leave_memory_flat():
    q, k, cos, sin = setup_case()
    q, k = q[:, :16].float().requires_grad_(), k[:, :16].float().requires_grad_()

    def burst(n):
        for _ in range(n):
            oq, ok = pirope.apply_rope_qk(q, k, cos, sin)
            (oq.sum() + ok.sum()).backward()
            q.grad = k.grad = None
        gc.collect()

    burst(500)  # warm-up: allocator caches, autograd graph buffers
    before = rss_mb()
    burst(10_000)
    grown = rss_mb() - before
    assert grown < 20, f"RSS grew by {grown:.1f} MB over 10^4 forward+backward calls"


def test_rope_attention_threads_and_memory():
    q, k, cos, sin = setup_case()
    q, k = q[:, :96].float(), k[:, :96].float()
    v = torch.randn_like(k)
    serial = pirope.rope_attention(q, k, v, cos, sin)
    results = [None] * 4

    def work(i):
        results[i] = pirope.rope_attention(q, k, v, cos, sin)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, serial) for r in results)

    qs, ks, vs = (t[:, :8].clone().requires_grad_() for t in (q, k, v))

    def burst(n):
        for _ in range(n):
            pirope.rope_attention(qs, ks, vs, cos, sin).sum().backward()
            qs.grad = ks.grad = vs.grad = None
        gc.collect()

    burst(200)
    before = rss_mb()
    burst(2000)
    grown = rss_mb() - before
    assert grown < 20, f"RSS grew by {grown:.1f} MB over 2000 rope_attention forward+backward calls"
