"""RotaryEmbedding: tables, growth past the window, layouts, device moves."""

import warnings

import pytest
import torch

import pirope
from reference import cos_sin_table, rope_reference, tolerance


def test_tables_cover_the_window_and_match_float64():
    rope = pirope.RotaryEmbedding(128, max_position_embeddings=8192,
                                  scaling={"rope_type": "linear", "factor": 4.0})
    assert rope.cos.shape == (8192, 64) and rope.cos.dtype == torch.float32
    ref_cos, ref_sin = cos_sin_table(rope.inv_freq, 8192)
    assert (rope.cos.double() - ref_cos).abs().max() < 1e-7
    assert (rope.sin.double() - ref_sin).abs().max() < 1e-7
    # PI: position m of the extended model sees the angle of position m / 4
    plain = pirope.RotaryEmbedding(128, max_position_embeddings=2048)
    torch.testing.assert_close(rope.cos[4 * 511], plain.cos[511], atol=1e-6, rtol=0)


def test_cos_and_sin_are_float32_buffers_that_move_with_the_module():
    # "nn.Module holding the float32 cos/sin buffers": registered buffers (so .to(),
    # .cuda(), to_empty() move them), float32 at construction, not in the state_dict
    rope = pirope.RotaryEmbedding(32, max_position_embeddings=24, scaling={"rope_type": "linear", "factor": 2.0})
    buffers = dict(rope.named_buffers())
    assert buffers["cos"] is rope.cos and buffers["sin"] is rope.sin
    assert rope.cos.dtype == rope.sin.dtype == torch.float32 and rope.cos.shape == rope.sin.shape == (24, 16)
    ref_cos, ref_sin = cos_sin_table(rope.inv_freq, 24)
    torch.testing.assert_close(rope.cos.double(), ref_cos, atol=1e-7, rtol=0)
    torch.testing.assert_close(rope.sin.double(), ref_sin, atol=1e-7, rtol=0)
    assert "cos" not in rope.state_dict() and "sin" not in rope.state_dict()
    rope.to("meta")  # a device move (no GPU needed) takes the tables along
    assert rope.cos.device.type == rope.sin.device.type == "meta"


def test_grows_for_longer_sequences():
    rope = pirope.RotaryEmbedding(32, max_position_embeddings=16)
    q = torch.randn(1, 40, 2, 32)
    k = torch.randn(1, 40, 1, 32)
    oq, ok = rope(q, k)
    assert rope.cos.shape[0] == 40
    torch.testing.assert_close(oq.double(), rope_reference(q, rope.cos, rope.sin))
    torch.testing.assert_close(ok.double(), rope_reference(k, rope.cos, rope.sin))


def test_interleaved_and_partial():
    rope = pirope.RotaryEmbedding(64, max_position_embeddings=32, partial_rotary_factor=0.5, interleaved=True)
    assert rope.rotary_dim == 32
    q = torch.randn(2, 10, 4, 64)
    k = torch.randn(2, 10, 4, 64)
    oq, _ = rope(q, k)
    torch.testing.assert_close(oq.double(), rope_reference(q, rope.cos, rope.sin, interleaved=True))
    assert torch.equal(oq[..., 32:], q[..., 32:])


def test_buffers_follow_dtype_moves_and_are_not_saved():
    rope = pirope.RotaryEmbedding(32, max_position_embeddings=16)
    assert rope.state_dict() == {}
    rope = rope.to(torch.float64)
    moved = rope.cos
    q = torch.randn(1, 4, 2, 32, dtype=torch.float64)
    oq, _ = rope(q, q.clone())
    torch.testing.assert_close(oq, rope_reference(q, rope.cos, rope.sin))
    assert rope.cos is moved  # the moved tables are the module's own: not recomputed
    # a complex dtype (Module.to moves floating buffers to it) cannot hold a table: float32 again
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch: complex modules are a new feature)
        rope = rope.to(torch.complex64)
    assert rope.inv_freq.dtype == rope.cos.dtype == rope.sin.dtype == torch.float32
    torch.testing.assert_close(rope(q, q.clone())[0], oq, atol=1e-6, rtol=1e-6)


def test_half_and_bfloat16_moves_keep_float32_tables():
    # model.to(bfloat16) must not round the tables (nor the frequencies a longer table
    # is rebuilt from): the module stays exactly the float32 one
    ref = pirope.RotaryEmbedding(128, max_position_embeddings=16, scaling={"rope_type": "linear", "factor": 2.0})
    for move in (lambda m: m.to(torch.bfloat16), lambda m: m.half()):
        rope = move(pirope.RotaryEmbedding(128, max_position_embeddings=16,
                                           scaling={"rope_type": "linear", "factor": 2.0}))
        assert rope.cos.dtype == rope.sin.dtype == rope.inv_freq.dtype == torch.float32
        for seqlen in (8, 4096, 8):  # inside the table, growing it, inside again
            q = torch.randn(1, seqlen, 1, 128)
            torch.testing.assert_close(rope(q, q.clone())[0], ref(q, q.clone())[0], rtol=0, atol=0)


def test_grows_for_position_ids_past_the_table():
    # a decode step (one token) at a position past max_position_embeddings and seqlen
    rope = pirope.RotaryEmbedding(32, max_position_embeddings=16)
    q, k = torch.randn(1, 1, 2, 32), torch.randn(1, 1, 1, 32)
    pos = torch.tensor([[20]])
    oq, ok = rope(q, k, pos)
    assert rope.cos.shape[0] == 32  # at least doubled: decoding past it rebuilds rarely
    want = pirope.RotaryEmbedding(32, max_position_embeddings=64)
    torch.testing.assert_close(oq.double(), rope_reference(q, want.cos, want.sin, pos))
    torch.testing.assert_close(ok.double(), rope_reference(k, want.cos, want.sin, pos))
    # the maximum is read again when the same tensor is changed in place
    pos[0, 0] = 40
    rope(q, k, pos)
    assert rope.cos.shape[0] == 64


def test_rejects_a_head_dim_other_than_the_modules():
    rope = pirope.RotaryEmbedding(64, max_position_embeddings=32)
    q = torch.randn(1, 8, 4, 64)
    with pytest.raises(ValueError, match="q must have head_dim 64"):
        rope(torch.randn(1, 8, 4, 128), q)
    with pytest.raises(ValueError, match="k must have head_dim 64"):
        rope(q, torch.randn(1, 8, 4, 32))


def _table_rows(rope, positions, key=None):
    """float64 reference cos/sin rows of the module's frequencies (key: its plan's)."""
    inv_freq, factor = rope._plan.frequencies(key)
    cos, sin = cos_sin_table(inv_freq, positions)
    return cos * factor, sin * factor


def test_pickles_after_a_forward_with_position_ids():
    # torch.save(model) and multiprocessing pickle modules; the cache of the last
    # position_ids (a weak reference) must not get in the way
    import pickle
    rope = pirope.RotaryEmbedding(32, max_position_embeddings=16)
    q = torch.randn(1, 4, 2, 32)
    pos = torch.tensor([[3, 4, 5, 6]])
    want = rope(q, q.clone(), pos)[0]
    copy = pickle.loads(pickle.dumps(rope))
    torch.testing.assert_close(copy(q, q.clone(), pos)[0], want, rtol=0, atol=0)


def test_rereads_cpu_position_ids_written_behind_torchs_back():
    # a write through NumPy (or .data) does not bump the version counter: on the CPU the
    # maximum is read every call, so the longrope switch still follows the positions
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
               "original_max_position_embeddings": 64, "factor": 4.0}
    rope = pirope.RotaryEmbedding(16, max_position_embeddings=256, scaling=scaling)
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    array = torch.tensor([[10]]).numpy()
    pos = torch.from_numpy(array)
    rope(q, q.clone(), pos)
    array[0, 0] = 200  # past the original window: long factors
    got = rope(q, q.clone(), pos)[0]
    cos, sin = _table_rows(rope, torch.tensor([200]), "long")
    torch.testing.assert_close(got, rope_reference(q, cos, sin, torch.tensor([0])))


def test_threads_sharing_a_length_dependent_module_get_their_own_tables():
    # an inference server shares one module: a longrope switch made for one thread's
    # long request must not rotate the other thread's short request
    import sys
    import threading
    scaling = {"rope_type": "longrope", "short_factor": [1.0] * 16, "long_factor": [16.0] * 16,
               "original_max_position_embeddings": 512, "factor": 8.0}
    rope = pirope.RotaryEmbedding(32, max_position_embeddings=4096, scaling=scaling)
    fresh = pirope.RotaryEmbedding(32, max_position_embeddings=4096, scaling=scaling)
    q = torch.randn(1, 1, 1, 32)
    cases = {"long": torch.tensor([[3000]]), "short": torch.tensor([[100]])}
    want = {name: fresh(q, q.clone(), pos)[0] for name, pos in cases.items()}
    wrong = {"long": 0, "short": 0}

    def serve(name):
        for _ in range(150):
            if not torch.equal(rope(q, q.clone(), cases[name].clone())[0], want[name]):
                wrong[name] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=serve, args=(name,)) for name in cases]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong == {"long": 0, "short": 0}


def test_builds_under_a_meta_device_context_and_reset_parameters_restores_after_to_empty():
    # the large-model init flow: build under torch.device("meta") (buffers on the default
    # device, like parameters), to_empty(), reset_parameters()
    with torch.device("meta"):
        rope = pirope.RotaryEmbedding(32, max_position_embeddings=16, scaling={"rope_type": "linear", "factor": 2.0})
        inv_freq, _ = pirope.rope_frequencies(32)
    assert inv_freq.device.type == "cpu"  # frequencies are computed on the CPU
    assert rope.inv_freq.device.type == rope.cos.device.type == "meta"
    # meta buffers survive dtype moves and growth (no values are read)
    rope.half()
    rope(torch.randn(1, 40, 1, 32, device="meta"), torch.randn(1, 40, 1, 32, device="meta"))
    assert rope.cos.shape == (40, 16) and rope.cos.dtype == torch.float32
    want = pirope.RotaryEmbedding(32, max_position_embeddings=16, scaling={"rope_type": "linear", "factor": 2.0})
    rope.to_empty(device="cpu")
    rope.reset_parameters()
    want(torch.randn(1, 40, 1, 32), torch.randn(1, 40, 1, 32))  # the same growth
    torch.testing.assert_close(rope.cos, want.cos, rtol=0, atol=0)
    torch.testing.assert_close(rope.inv_freq, want.inv_freq, rtol=0, atol=0)
    q = torch.randn(1, 8, 2, 32)
    torch.testing.assert_close(rope(q, q.clone())[0], want(q, q.clone())[0], rtol=0, atol=0)


def test_to_empty_off_the_meta_device_recomputes_the_tables():
    # meta tensors hold no values: leaving the meta device rebuilds instead of keeping garbage
    for scaling in (None, {"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}):
        with torch.device("meta"):
            rope = pirope.RotaryEmbedding(32, max_position_embeddings=16, scaling=scaling)
            rope(torch.randn(1, 40, 1, 32), torch.randn(1, 40, 1, 32))  # meta growth, no values read
        rope.to_empty(device="cpu")
        want = pirope.RotaryEmbedding(32, max_position_embeddings=16, scaling=scaling)
        q = torch.randn(1, 40, 2, 32)
        want(q, q.clone())  # the same growth (for "dynamic": the table of length 40)
        assert torch.equal(rope.inv_freq, want.inv_freq) and torch.equal(rope.cos, want.cos)
        assert torch.equal(rope(q, q.clone())[0], want(q, q.clone())[0])


@pytest.mark.parametrize("compiled", [False, True])
def test_tables_replaced_from_outside_are_recomputed_at_the_next_call(compiled):
    # what transformers' from_pretrained does to every non-persistent buffer
    rope = pirope.RotaryEmbedding(32, max_position_embeddings=16, scaling={"rope_type": "linear", "factor": 2.0})
    want = pirope.RotaryEmbedding(32, max_position_embeddings=16, scaling={"rope_type": "linear", "factor": 2.0})
    for name in ("inv_freq", "cos", "sin"):
        setattr(rope, name, torch.full_like(getattr(rope, name), float("nan")))
    call = torch.compile(rope, backend="eager") if compiled else rope  # (the rebuild breaks the graph once)
    q = torch.randn(1, 12, 2, 32)
    pos = torch.arange(12)[None] if compiled else None  # the compiled path's rows of positions
    assert torch.equal(call(q, q.clone(), pos)[0], want(q, q.clone())[0])
    assert torch.equal(rope.cos, want.cos) and torch.equal(rope.inv_freq, want.inv_freq)


def test_a_transformers_model_holding_the_module_reloads_with_its_tables(tmp_path):
    transformers = pytest.importorskip("transformers")

    class Config(transformers.PretrainedConfig):
        model_type = "pirope_rope_test"

    class Model(transformers.PreTrainedModel):
        config_class = Config

        def __init__(self, config):
            super().__init__(config)
            self.proj = torch.nn.Linear(16, 16)
            self.rope = pirope.RotaryEmbedding(16, max_position_embeddings=64,
                                               scaling={"rope_type": "linear", "factor": 2.0})
            self.post_init()

        def forward(self, x):
            q = self.proj(x)
            return self.rope(q, q)[0]

    torch.manual_seed(0)
    model = Model(Config()).eval()
    x = torch.randn(1, 40, 2, 16)
    model.save_pretrained(tmp_path)
    # from_pretrained builds on the meta device, then fills every non-persistent buffer
    # with torch.empty_like; transformers' _init_weights refills only its own rotary classes
    loaded = Model.from_pretrained(tmp_path).eval()
    assert torch.equal(loaded(x), model(x))


def test_decoding_past_the_table_rebuilds_it_rarely():
    # one token at a time from 16 to 300: the table at least doubles when it grows,
    # so it is rebuilt O(log n) times, not once per token
    rope = pirope.RotaryEmbedding(16, max_position_embeddings=16)
    sizes = set()
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    for p in range(16, 300):
        got = rope(q, q.clone(), torch.tensor([[p]]))[0]
        sizes.add(rope.cos.shape[0])
        if p % 37 == 0:
            cos, sin = _table_rows(rope, torch.tensor([p]))
            torch.testing.assert_close(got, rope_reference(q, cos, sin, torch.tensor([0])))
    assert sorted(sizes) == [32, 64, 128, 256, 512]


@pytest.mark.parametrize("scaling", [None, {"rope_type": "dynamic", "factor": 4.0}])
def test_sparse_positions_get_rows_of_their_own(scaling):
    # a huge offset (or a padding sentinel like 2**31 - 1) with a few tokens must not
    # build a table up to it; a dynamic-NTK decode step past the window builds the rows
    # of its own position with the base of its length
    rope = pirope.RotaryEmbedding(16, max_position_embeddings=64, scaling=scaling)
    q = torch.randn(2, 3, 1, 16, dtype=torch.float64)
    cases = [torch.tensor([[2**31 - 1, 5, 2**40], [7, 2**33, 1]])]
    if scaling is not None:
        cases.append(torch.tensor([[100, 101, 102]] * 2))  # static tables would grow to 128 here
    for pos in cases:
        got = rope(q, q.clone(), pos)[0]
        assert rope.cos.shape[0] == 64  # untouched
        end = int(pos.max()) + 1
        cos, sin = _table_rows(rope, pos.reshape(-1), rope._plan.key(end))
        index = torch.arange(pos.numel()).view(pos.shape)
        torch.testing.assert_close(got, rope_reference(q, cos, sin, index))


def test_negative_positions_rotate_by_negative_angles():
    # as transformers allows (attention_mask.cumsum(-1) - 1 gives -1 at left padding)
    rope = pirope.RotaryEmbedding(16, max_position_embeddings=32)
    q = torch.randn(1, 3, 2, 16, dtype=torch.float64)
    got = rope(q, q.clone(), torch.tensor([[-1, 0, -5]]))[0]
    cos, sin = _table_rows(rope, torch.tensor([1, 0, 5]))  # cos(-a) = cos(a), sin(-a) = -sin(a)
    torch.testing.assert_close(got, rope_reference(q, cos, -sin))


def test_rejects_bad_position_ids_before_growing_the_table():
    rope = pirope.RotaryEmbedding(16, max_position_embeddings=32)
    q = torch.randn(1, 1, 1, 16)
    with pytest.raises(TypeError, match="position_ids must be int32 or int64"):
        rope(q, q.clone(), torch.tensor([[100000.0]]))
    assert rope.cos.shape[0] == 32


def test_reports_the_base_and_partial_rotary_factor_in_effect():
    # a transformers 5 rope_parameters dict carries rope_theta / partial_rotary_factor
    rope = pirope.RotaryEmbedding(64, max_position_embeddings=16, scaling={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0, "partial_rotary_factor": 0.5})
    assert rope.base == 500000.0 and rope.partial_rotary_factor == 0.5 and rope.rotary_dim == 32
    assert "base=500000.0" in repr(rope)
    inv_freq, _ = pirope.rope_frequencies(64, base=500000.0, partial_rotary_factor=0.5,
                                          scaling={"rope_type": "linear", "factor": 2.0})
    torch.testing.assert_close(rope.inv_freq, inv_freq, rtol=0, atol=0)


def test_tables_built_under_inference_mode_serve_later_training():
    # evaluate, then fine-tune: a table grown inside inference_mode must not be an
    # inference tensor, which autograd could not save for backward
    with torch.inference_mode():
        built_inside = pirope.RotaryEmbedding(16, max_position_embeddings=8)
    assert not any(b.is_inference() for b in built_inside.buffers())
    rope = pirope.RotaryEmbedding(16, max_position_embeddings=8)
    with torch.inference_mode():
        rope(torch.randn(1, 40, 1, 16), torch.randn(1, 40, 1, 16))
    assert not rope.cos.is_inference()
    for recompute in (rope.reset_parameters, lambda: rope.to(torch.bfloat16)):  # (tables rebuilt in float32)
        with torch.inference_mode():
            recompute()
        assert not any(b.is_inference() for b in rope.buffers())
    q = torch.randn(1, 40, 1, 16, dtype=torch.float64, requires_grad=True)
    oq, _ = rope(q, q.detach().clone())
    oq.sum().backward()
    # the gradient of a rotation is the rotation by the negative angle
    g = torch.ones_like(q)
    torch.testing.assert_close(q.grad, rope_reference(g, rope.cos, -rope.sin))


@pytest.mark.parametrize("scaling", [None, {"rope_type": "longrope", "short_factor": [2.0] * 8,
                                             "long_factor": [2.0] * 8, "original_max_position_embeddings": 16}],
                         ids=["default", "longrope_one_table"])
@pytest.mark.parametrize("pos", [[[-1, 0, 5]], [[5, 1000000, 2**33]], [[0, 1, 2]]])
def test_compiled_module_equals_eager_for_any_positions(pos, scaling):
    # under torch.compile the module builds the rows of the call's positions (no host
    # read of the largest one): the same values as eager, also for negative and sparse ids.
    # A longrope whose long and short factors agree (Phi-3-style PI) has one table too.
    torch._dynamo.reset()
    rope = pirope.RotaryEmbedding(16, max_position_embeddings=32, scaling=scaling)
    q = torch.randn(1, 3, 2, 16)
    pos = torch.tensor(pos)
    want = rope(q, q.clone(), pos)
    got = torch.compile(rope, fullgraph=True)(q, q.clone(), pos)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
def test_compiled_module_takes_tokens_and_positions_picked_by_a_mask():
    # padding dropped by a boolean mask: the token count (and the position_ids' numel) is
    # known only when the compiled graph runs; every kept token keeps its position
    torch._dynamo.reset()
    rope = pirope.RotaryEmbedding(16, max_position_embeddings=32, scaling={"rope_type": "linear", "factor": 2.0})

    def rotate(q, k, keep):
        return rope(q[keep], k[keep], keep.nonzero().squeeze(1))

    compiled = torch.compile(rotate, backend="aot_eager", fullgraph=True)
    q, k = torch.randn(12, 4, 16), torch.randn(12, 2, 16)
    for keep in (torch.rand(12) > 0.4, torch.zeros(12, dtype=torch.bool)):  # (also none kept)
        pos = keep.nonzero().squeeze(1)
        got = compiled(q, k, keep)
        for g, x in zip(got, (q[keep], k[keep])):
            assert g.shape == x.shape
            torch.testing.assert_close(g.double(), rope_reference(x, rope.cos, rope.sin, pos), atol=1e-6, rtol=1e-6)


def test_positions_are_read_once_per_tensor_where_a_read_is_a_device_sync():
    # reading position_ids' range off a GPU is a sync: read once per tensor (and version); on
    # the CPU every call. Meta tensors stand in for device ones (no GPU needed).
    import copy
    import pickle

    from pirope.frequencies import PositionsMemo

    memo, reads = PositionsMemo(), []

    def read(p):
        reads.append(p.device.type)
        return len(reads)

    p = torch.zeros(2, 8, dtype=torch.long, device="meta")
    assert (memo.get(p, read), memo.get(p, read)) == (1, 1)
    p.add_(1)  # written in place: read again
    assert memo.get(p, read) == 2
    assert memo.get(torch.zeros(2, 8, dtype=torch.long, device="meta"), read) == 3  # another tensor
    c = torch.zeros(8, dtype=torch.long)
    assert (memo.get(c, read), memo.get(c, read)) == (4, 5)  # the CPU: every call
    with torch.inference_mode():
        i = torch.zeros(8, dtype=torch.long, device="meta")  # no version counter: every call
    assert (memo.get(i, read), memo.get(i, read)) == (6, 7)
    memo.get(p, read)
    for twin in (copy.deepcopy(memo), pickle.loads(pickle.dumps(memo))):
        assert twin._seen is None


def test_the_layer_types_of_a_patched_model_read_their_positions_once():
    transformers = pytest.importorskip("transformers")
    import copy

    from pirope.integrations.transformers import patch_rope

    config = transformers.Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                           vocab_size=256, sliding_window=16,
                                           layer_types=["sliding_attention", "full_attention"])
    rotary = patch_rope(transformers.Gemma3ForCausalLM(config)).model.rotary_emb
    memos = {id(r._positions) for r in rotary.by_type.values()}
    assert len(memos) == 1  # one memo for both layer types
    copied = copy.deepcopy(rotary)
    assert len({id(r._positions) for r in copied.by_type.values()} | memos) == 2  # shared in the copy, its own


def test_modules_pickled_before_the_positions_memo_load():
    # pickles of an older pirope carry _positions_seen=None (RotaryEmbedding) or no
    # _positions (the transformers integration's rotary embedding)
    from pirope.frequencies import PositionsMemo

    old = pirope.RotaryEmbedding(64, max_position_embeddings=16).__getstate__()
    old["_positions_seen"] = None
    del old["_own_tables"]  # (older still: no record of the tables it computed; they are its own)
    module = pirope.RotaryEmbedding.__new__(pirope.RotaryEmbedding)
    module.__setstate__(old)
    assert isinstance(module._positions_seen, PositionsMemo)
    q = torch.randn(1, 4, 2, 64)
    torch.testing.assert_close(module(q, q)[0], pirope.RotaryEmbedding(64, max_position_embeddings=16)(q, q)[0])
    pytest.importorskip("transformers")
    from pirope.integrations.transformers import PiropeRotaryEmbedding

    old = PiropeRotaryEmbedding(64, max_position_embeddings=16).__getstate__()
    del old["_positions"]
    module = PiropeRotaryEmbedding.__new__(PiropeRotaryEmbedding)
    module.__setstate__(old)
    assert module(torch.zeros(1, 4, 64), torch.arange(4)[None]).cos.shape[1] == 32


# ---- rotate(x): one tensor, for code that rotates q and k apart -------------------------

ROTATE_SCALINGS = [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},                       # tables depend on the length
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},  # attention factor
    {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [3.0] * 8,
     "original_max_position_embeddings": 16},
]


@pytest.mark.parametrize("scaling", ROTATE_SCALINGS)
@pytest.mark.parametrize("positions", ["none", "shared", "per-row", "packed", "past the table",
                                       "to longrope's window", "to the window"])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotate_is_forward_on_one_tensor(scaling, positions, interleaved):
    # rotate(x, position_ids) rotates x exactly as forward rotates q (and k): the same table,
    # chosen by the same positions, and both equal the float64 rotation by that table
    def fresh():
        return pirope.RotaryEmbedding(16, max_position_embeddings=32, scaling=scaling, interleaved=interleaved)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 3, 16, generator=g, dtype=torch.float64)
    position_ids = {"none": None, "shared": torch.arange(5, 29), "per-row": torch.stack((torch.arange(24),
                    torch.arange(40, 64))), "packed": torch.cat((torch.arange(10), torch.arange(14))),
                    "past the table": torch.arange(100, 124),
                    # the largest position at the last one of an original window: longrope's, the table's
                    "to longrope's window": torch.arange(24) % 16, "to the window": torch.arange(8, 32)}[positions]
    if positions == "packed":
        x = x[0]
    rope, twin = fresh(), fresh()
    out = rope.rotate(x, position_ids)
    q, k = twin(x, x[..., :1, :], position_ids)
    torch.testing.assert_close(out, q, rtol=0, atol=0)
    torch.testing.assert_close(out[..., :1, :], k, rtol=0, atol=0)
    # the table the call used: plain positions index it, rows of the call's own otherwise
    needed = 24 if position_ids is None else int(position_ids.max()) + 1
    inv_freq, attention_factor = pirope.rope_frequencies(16, scaling=scaling, max_position_embeddings=32,
                                                         seq_len=needed)
    cos, sin = cos_sin_table(inv_freq, needed, attention_factor)
    torch.testing.assert_close(out, rope_reference(x, cos, sin, position_ids, interleaved=interleaved),
                               rtol=1e-6, atol=1e-6)


def test_packed_tokens_without_positions_and_calls_without_tokens():
    # packed (tokens, heads, head_dim) without position_ids: token i at position i, the table
    # grown to the token count (not the head count); calls with no token rotate nothing
    rope = pirope.RotaryEmbedding(16, max_position_embeddings=8, interleaved=True)
    assert "interleaved=True" in repr(rope)
    x = torch.randn(20, 2, 16, dtype=torch.float64)
    inv_freq, _ = pirope.rope_frequencies(16)
    cos, sin = cos_sin_table(inv_freq, 20)
    torch.testing.assert_close(rope.rotate(x), rope_reference(x, cos, sin, interleaved=True), rtol=1e-6, atol=1e-6)
    none = torch.zeros(1, 0, dtype=torch.int64)
    for q, pos in ((torch.randn(1, 0, 2, 16), none), (torch.randn(0, 2, 16), none[0]),
                   (torch.randn(1, 0, 2, 16), None)):
        oq, ok = rope(q, q[..., :1, :], pos)
        assert oq.shape == q.shape and ok.shape == q[..., :1, :].shape
        assert rope.rotate(q, pos).shape == q.shape


def test_rotate_in_bfloat16_backward_and_compiled():
    rope = pirope.RotaryEmbedding(32, max_position_embeddings=64, scaling={"rope_type": "linear", "factor": 2.0})
    x = torch.randn(1, 40, 2, 32, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(10, 50)
    out = rope.rotate(x, pos)
    torch.testing.assert_close(out.double(), rope_reference(x, rope.cos, rope.sin, pos), **tolerance(torch.bfloat16))
    # backward: the rotation by the negative angle
    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(gx.double(), rope_reference(grad, rope.cos, rope.sin, pos, conjugate=True),
                               **tolerance(torch.bfloat16))
    compiled = torch.compile(rope.rotate, fullgraph=True)
    torch.testing.assert_close(compiled(x.detach(), pos), out.detach(), rtol=0, atol=0)


def test_rotate_rejects_bad_input_naming_it():
    rope = pirope.RotaryEmbedding(16, max_position_embeddings=8)
    with pytest.raises(ValueError, match=r"RotaryEmbedding.rotate: x must have head_dim 16"):
        rope.rotate(torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"RotaryEmbedding.rotate: x must be \(batch, seqlen, heads, head_dim\)"):
        rope.rotate(torch.randn(4, 16))
    with pytest.raises(TypeError, match=r"RotaryEmbedding.rotate: position_ids must be int32 or int64"):
        rope.rotate(torch.randn(1, 4, 2, 16), torch.arange(4.0))
    with pytest.raises(TypeError, match=r"RotaryEmbedding.rotate: x must be a torch.Tensor"):
        rope.rotate([[1.0]])
    assert rope.cos.shape[0] == 8  # nothing grew


@pytest.mark.parametrize("with_positions", [False, True])
def test_compiled_dynamic_ntk_tables_equal_eager(with_positions):
    # dynamic NTK's frequencies of a length are computed eagerly under torch.compile (as
    # transformers computes them): traced, inductor's float32 pow moved them by 1.5e-7,
    # 2e-3 in the output at 5k positions, and the module kept that table for eager calls
    torch._dynamo.reset()
    scaling = {"rope_type": "dynamic", "factor": 4.0}
    rope, want = (pirope.RotaryEmbedding(128, max_position_embeddings=1600, scaling=scaling) for _ in range(2))
    q = torch.randn(1, 5000, 1, 128)
    pos = torch.arange(5000)[None] if with_positions else None
    got = torch.compile(rope)(q, q.clone(), pos)
    ref = want(q, q.clone(), pos)
    assert torch.equal(rope.inv_freq, want.inv_freq) and torch.equal(rope.cos, want.cos)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
