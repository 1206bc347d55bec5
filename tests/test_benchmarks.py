"""The benchmarks (benchmarks/*.py) as users run them: each CPU benchmark end to end on a
tiny configuration (its rows written, its own correctness columns small), and every
command line refusing bad values with argparse's usage error naming the flag (exit
status 2, no traceback). Timings are not checked: they are the benchmarks' output."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
TINY = ["--headdim", "32", "--heads", "4/2", "--repeat", "1", "--dtypes", "float32"]


def run(script, *args, tmp_path):
    """Runs benchmarks/<script> in a fresh process (2 threads); returns its JSON output."""
    out = tmp_path / "rows.json"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), *args, "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return json.loads(out.read_text())


def diffs(rows):
    """Every max |difference| from the baseline a table row reports."""
    return [float(v) for row in rows for key, v in row.items() if "diff" in key and v is not None]


@pytest.mark.parametrize("script,args,methods,configs", [
    ("bench_attention_window.py", ["--seqlens", "64", "--windows", "16"], "a,b,c,d,e", 1),
    ("bench_attention_softcap.py", ["--seqlens", "64", "--windows", "0,16"], "a,b,c,d,e", 2),
    ("bench_attention_sinks.py", ["--seqlens", "64", "--windows", "0,16"], "a,b,c,d,e", 2),
    ("bench_attention_varlen.py", ["--lengths", "40,24", "7,1,30"], "a,b,c", 2),
])
def test_eager_baseline_benchmarks_run_and_agree(script, args, methods, configs, tmp_path):
    result = run(script, *TINY, *args, "--methods", methods, tmp_path=tmp_path)
    rows = result["rows"]
    assert len(rows) == 2 * configs  # a row per configuration and mode
    assert {row["mode"] for row in rows} == {"fwd", "fwd+bwd"}
    found = diffs(rows)
    assert found and max(found) < 1e-4, found  # float32 against the baseline (or a float64 reference)


def test_attention_benchmark_runs(tmp_path):
    rows = run("bench_attention.py", *TINY[:4], "--heads", "4/2,4/4", "--seqlens", "48,64", "--repeat", "1",
               "--dtypes", "float32,bfloat16", "--methods", "a,b,d", tmp_path=tmp_path)
    assert len(rows) == 2 * 2 * 2 * 2 * 3  # dtypes x heads x seqlens x modes x methods
    fused = [r for r in rows if r["method"] == "fused"]
    assert all(r["median_s"] > 0 and r["speedup_vs_hf"] > 0 for r in fused)
    # the correctness column: every method's output (and gradients) against (a)'s
    for r in rows:
        assert r["rel_diff_vs_hf"] < (1e-5 if r["dtype"] == "float32" else 3e-2), r
    assert all(r["peak_mem_bytes"] > 0 for r in rows if r["mode"] == "fwd+bwd")


@pytest.mark.parametrize("layer", [[], ["--gemma4", "--head-dim", "64"], ["--mrope"], ["--llama4"],
                                   ["--mla", "--kv-heads", "4"]],
                         ids=["llama", "gemma4", "mrope", "llama4", "mla"])
def test_decoder_layer_benchmark_runs_and_agrees(tmp_path, layer):
    rows = run("bench_decoder_layer.py", "--device", "cpu", "--seqlens", "64", "--hidden", "128", "--heads", "4",
               "--kv-heads", "2", "--intermediate", "256", "--window", "32", "--repeat", "1", "--dtype", "float32",
               *layer, tmp_path=tmp_path)
    assert {r["variant"] for r in rows} >= {"hf", "pirope_sdpa", "pirope_fused"}
    gemma4, mrope, llama4, mla = "--gemma4" in layer, "--mrope" in layer, "--llama4" in layer, "--mla" in layer
    assert all(r["gemma4"] == gemma4 and r["mrope"] == mrope and r["llama4"] == llama4 and r["mla"] == mla
               and r["head_dim"] == (64 if gemma4 else 192 if mla else 32) for r in rows)
    assert not [r for r in rows if "error" in r]
    compared = [r for r in rows if r["variant"] != "hf"]
    assert all(r["diff_out"] < 1e-5 and r["diff_grad"] < 1e-4 for r in compared), compared


def test_loss_benchmark_runs_and_agrees(tmp_path):
    result = run("bench_loss.py", "--seqlens", "64,100", "--vocab", "500", "--hidden", "32", "--chunk", "16",
                 "--repeat", "1", tmp_path=tmp_path)
    assert result["chunk"] == 16 and [r["seqlen"] for r in result["rows"]] == [64, 100]
    for r in result["rows"]:  # float32: pirope's chunked loss and lm_head gradient are transformers'
        assert float(r["loss diff"]) < 1e-5 and float(r["grad diff"]) < 1e-5, r
        assert r["transformers ms"] > 0 and r["pirope ms"] > 0 and r["x"] > 0, r


def test_rope_benchmark_runs(tmp_path):
    result = run("bench_rope.py", "--device", "cpu", "--seqlen", "64", "--heads", "4/2", "--head-dim", "32",
                 "--repeat", "1", "--no-compile", "--dtype", "float32", tmp_path=tmp_path)
    assert [r["mode"] for r in result["rows"]] == ["fwd", "fwd+bwd"]
    assert all(r["pirope_ms"] > 0 and r["rel_diff_vs_hf"] < 1e-6 for r in result["rows"])


def test_rope_benchmark_compiles_every_case_it_times(monkeypatch):
    # one compile cache per case: with one shared by all, dynamo's recompile limit (8; 2
    # entries per case, fwd and fwd+bwd) turned the later cases' "compiled" baseline into
    # eager, silently. Here with a limit of 2 (one case's worth) and a recording backend.
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_(fn, backend=backend, dynamic=kw.get("dynamic")))
    bench = _module("bench_rope.py")
    with torch._dynamo.config.patch(recompile_limit=2):  # (not monkeypatch: torch 2.11's config breaks)
        for dtype in (torch.float32, torch.bfloat16, torch.float32):
            bench.bench_case("cpu", dtype, 1, 16, 2, 1, 16, 1, True)
    assert len(graphs) == 3 * 2


def _module(script):
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(BENCHMARKS, script))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _main(script):
    return _module(script).main


def usage_error(script, argv, monkeypatch, capsys) -> str:
    """The error line of ``script argv``, after checking that it ended as argparse's usage
    error (exit status 2, the usage printed; no traceback)."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    with pytest.raises(SystemExit) as exit_:
        _main(script)()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:"), err
    return err.strip().splitlines()[-1]


BAD_FLAGS = [
    ("bench_attention.py", ["--heads", "32"], "--heads"),
    ("bench_attention.py", ["--heads", "32/5"], "--heads"),
    ("bench_attention.py", ["--seqlens", "512,abc"], "--seqlens"),
    ("bench_attention.py", ["--seqlens", "0"], "--seqlens"),
    ("bench_attention.py", ["--dtypes", "float33"], "--dtypes"),
    ("bench_attention.py", ["--methods", "a,z"], "--methods"),
    ("bench_attention.py", ["--modes", "bwd"], "--modes"),
    ("bench_attention.py", ["--headdim", "63"], "--headdim"),
    ("bench_attention.py", ["--repeat", "0"], "--repeat"),
    ("bench_attention.py", ["--device", "tpu9"], "--device"),
    ("bench_attention_window.py", ["--windows", "-3"], "--windows"),
    ("bench_attention_softcap.py", ["--windows", "x"], "--windows"),
    ("bench_attention_softcap.py", ["--softcap", "-50"], "--softcap"),
    ("bench_decoder_layer.py", ["--device", "cpu", "--factor", "nan"], "--factor"),
    ("bench_decoder_layer.py", ["--device", "cpu", "--softcap", "0"], "--softcap"),
    ("bench_attention_sinks.py", ["--heads", "a/b"], "--heads"),
    ("bench_attention_varlen.py", ["--lengths", "10,,5"], "--lengths"),
    ("bench_decoder_layer.py", ["--variants", "hf,nope"], "--variants"),
    ("bench_decoder_layer.py", ["--dtype", "int8"], "--dtype"),
    ("bench_decoder_layer.py", ["--device", "cpu", "--heads", "32", "--kv-heads", "5"], "--kv-heads"),
    ("bench_decoder_layer.py", ["--device", "cpu", "--pack", "0"], "--pack"),
    ("bench_decoder_layer.py", ["--device", "cpu", "--gemma4", "--softcap", "50"], "--gemma4"),
    ("bench_decoder_layer.py", ["--device", "cpu", "--mrope", "--pack", "2"], "--mrope"),
    ("bench_decoder_layer.py", ["--device", "cpu", "--llama4", "--sliding-window", "16"], "--llama4"),
    ("bench_decoder_layer.py", ["--device", "cpu", "--mla", "--softcap", "50"], "--mla"),
    ("bench_decoder_layer.py", ["--device", "cpu", "--mla", "--kv-heads", "8"], "--mla"),
    ("bench_decoder_layer.py", ["--device", "cpu", "--seqlens", "2k"], "--seqlens"),
    ("bench_loss.py", ["--seqlens", "1"], "--seqlens"),
    ("bench_loss.py", ["--chunk", "0"], "--chunk"),
    ("bench_loss.py", ["--autocast", "fp8"], "--autocast"),
    ("bench_rope.py", ["--heads", "32/8", "7"], "--heads"),
    ("bench_rope.py", ["--seqlen", "-1"], "--seqlen"),
    ("bench_attention_gpu.py", ["--causal", "yes"], "--causal"),
    ("bench_attention_gpu.py", ["--dtypes", "float32"], "--dtypes"),
    ("profile_attention_gpu.py", ["--heads", "8/32"], "--heads"),
]


@pytest.mark.parametrize("script,argv,flag", BAD_FLAGS, ids=[f"{s}{' '.join(a)}" for s, a, _ in BAD_FLAGS])
def test_bad_flags_are_usage_errors_naming_the_flag(script, argv, flag, monkeypatch, capsys):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")  # bench_attention.py re-executes itself without it
    error = usage_error(script, argv, monkeypatch, capsys)
    assert flag in error and "error:" in error, error


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where torch sees no GPU")
@pytest.mark.parametrize("script,argv", [("bench_attention_gpu.py", []), ("profile_attention_gpu.py", []),
                                         ("bench_rope.py", ["--device", "cuda"]),
                                         ("bench_attention_window.py", ["--device", "cuda:0"])])
def test_gpu_runs_without_a_gpu_are_usage_errors(script, argv, monkeypatch, capsys):
    error = usage_error(script, argv, monkeypatch, capsys)
    assert "CUDA GPU" in error, error


def test_gpu_benchmark_runs_a_methods_backward_in_its_environment(monkeypatch):
    # pirope's CUDA dispatch reads PIROPE_ATTENTION_SM90 / PIROPE_WS_DQ in the backward too: a
    # method's whole step (not its forward alone) runs in its environment, then it is restored
    bench = _module("bench_attention_gpu.py")
    monkeypatch.delenv("PIROPE_ATTENTION_SM90", raising=False)
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("fwd", os.environ.get("PIROPE_ATTENTION_SM90")))
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            seen.append(("bwd", os.environ.get("PIROPE_ATTENTION_SM90")))
            return g

    q, k, v = (torch.randn(1, 4, 2, 8, requires_grad=True) for _ in range(3))
    methods = bench.make_methods(torch.ones(4, 4), torch.zeros(4, 4), True, backward=True)
    fn, env = methods["fused_ws"]
    assert env == {"PIROPE_ATTENTION_SM90": "ws"} and methods["fused_ws_atomic"][1]["PIROPE_WS_DQ"] == "atomic"
    bench.make_step(lambda q, k, v: Probe.apply(q * k * v), env, q, k, v, torch.ones(1, 4, 2, 8))()
    assert seen == [("fwd", "ws"), ("bwd", "ws")] and "PIROPE_ATTENTION_SM90" not in os.environ
    assert q.grad is not None


def test_gpu_summary_tabulates_what_a_lease_left(tmp_path):
    # gpu_check.sh's last table, from the JSON files of the steps that ran (here an H100
    # run's committed results); a folder without any says so instead of failing
    import shutil

    results = os.path.join(BENCHMARKS, "results")
    shutil.copy(os.path.join(results, "h100_s6_run2_attention.json"), tmp_path / "bench_attention_gpu.json")
    shutil.copy(os.path.join(results, "h100_s6_run2_decoder_layer.json"), tmp_path / "bench_decoder_layer.json")
    (tmp_path / "bench_decoder_layer_ws.json").write_text('[{"seqlen": 2048')  # killed while writing
    shutil.copy(os.path.join(results, "cpu_loss.json"), tmp_path / "bench_loss.json")
    text = _module("gpu_summary.py").summary(str(tmp_path))
    assert "| 8192 | 30673.0 | 12200 | 21520.0 | 1076 | 1.43 | 11.3 | 0.0e+00 | 2.5e-07 |" in text
    assert "| bfloat16 | 32/8 | 16384 | True | fwd+bwd | 29.448 | - | cudnn | 14.676 | 0.50 | - | 6.0e-03 |" in text
    assert "Decoder layer (target" in text and "warp-specialised" not in text
    assert _module("gpu_summary.py").summary(str(tmp_path / "nothing")) == "(no benchmark results under this folder)"
