"""Every bench script runs end to end on the tiny checkpoint and writes the rows it promises.

Device time is scarce (one short call per lent GPU): a bench broken by a refactor must fail here,
on CPU, not in the GPU call. Flags mirror the ones bench/gpu_quick.sh passes, at tiny sizes.
Results go to a tmp dir (FASTFOCAL_BENCH_RESULTS), never to bench/results.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = "tests/data/tiny_causal"
CFG = f"{TINY}/config.json"
AUDIO = "tests/data/audio"

# (script, args, results file it appends to or None for stdout-only, text the output must hold)
CASES = [
    ("serve_capacity.py", ["--preset", CFG, "--modes", "full", "decode", "--dtypes", "float32", "--max-streams", "2",
                           "--reps", "2", "--warmup", "1", "--no-refine"], "serve_capacity.jsonl", None),
    ("serve_capacity.py", ["--preset", CFG, "--dtypes", "float32", "--reps", "2", "--warmup", "1",
                           "--probe", "full:2", "encode:2", "decode:3"], "serve_capacity.jsonl", None),
    ("stream_latency.py", ["--preset", CFG, "--modes", "full", "encode", "decode", "--dtypes", "float32", "bfloat16",
                           "--steps", "3", "--warmup", "1"], "stream_latency.jsonl", None),
    ("e2e.py", ["--preset", CFG, "--quick", "--dtypes", "float32", "--f32-dots", "ieee", "bf16x3", "--backends", "auto", "torch", "--batches", "1", "2",
                "--seconds", "1", "--reps", "1", "--steps", "3", "--tag", "smoke"], "e2e-smoke.json", None),
    ("engine_host.py", ["--model", TINY, "--streams", "3,5", "--steps", "2"], "engine_host.jsonl", None),
    ("engine_host.py", ["--model", TINY, "--mode", "full", "--streams", "3", "--steps", "2", "--host-only"],
     "engine_host.jsonl", None),
    ("precision.py", ["--model", TINY, "--audio", AUDIO, "--files", "1", "--seconds", "2"], "precision.jsonl", None),
    ("precision_parts.py", ["--model", TINY, "--audio", AUDIO, "--files", "1", "--seconds", "2"],
     "precision.jsonl", None),
    ("precision_split.py", ["--model", TINY, "--audio", AUDIO, "--files", "1", "--seconds", "2", "--modes", "bf16x3"],
     "precision.jsonl", "bf16x3"),
    ("precision_split.py", ["--check"], None, "tf32x3"),
    ("offline_profile.py", ["--model", TINY, "--dtypes", "float32", "--batch", "1", "--seconds", "1", "--reps", "1",
                            "--top", "3"], "offline_profile.jsonl", None),
    ("cpu_step.py", ["--preset", CFG, "--threads", "1", "--modes", "decode", "--dtypes", "fp32,bf16",
                     "--warmup", "1", "--steps", "2", "--no-onnx"], "cpu-step.jsonl", None),
    ("corpus_bench.py", ["--model", TINY, "--files", "3", "--min-s", "1", "--max-s", "2", "--workers", "1"],
     "corpus.jsonl", "bound:"),
    ("kernels/run_all.py", ["--quick", "--only", "focal_context", "attention", "bsq"], "kernels.jsonl", None),
    ("bf16_agreement.py", ["--model", TINY, "--audio", AUDIO, "--files", "1", "--device", "cpu"], None,
     "token agreement"),
    ("latent_error.py", ["--random-init", CFG, "--files", "1", "--audio", AUDIO], None, "sign flips"),
    ("golden_errors.py", [], None, "toks exact True"),
    ("roofline.py", ["--preset", CFG, "--streams", "1", "4"], None, "at most"),
    ("cpu_ops.py", ["--preset", CFG, "--steps", "2"], None, "calls/step"),
    ("cpu_micro.py", ["--reps", "2"], None, "per-group packed"),
    ("ab_step.py", ["float32", "--preset", CFG, "--pushes", "12"], None, "offline10s="),
    ("engine_ab.py", [str(ROOT), "2", "float32", "full", CFG], None, "p50"),
    ("serve_load.py", ["--model", TINY, "--clients", "1", "2", "--seconds", "1", "--fast"], "serve_load.jsonl",
     "errors 0"),
]


def _run(script, args, tmp_path, extra_env=None):
    env = {**os.environ, "FASTFOCAL_BENCH_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    return subprocess.run([sys.executable, f"bench/{script}", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("script,args,out,text", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bench_runs(script, args, out, text, tmp_path):
    r = _run(script, args, tmp_path)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    if text:
        assert text in log, log[-3000:]
    if out:
        path = tmp_path / out
        assert path.exists(), f"{script} wrote no {out}: {sorted(p.name for p in tmp_path.iterdir())}"
        if out.endswith(".jsonl"):
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            rows = json.loads(path.read_text())["rows"]
        assert rows, f"{script}: {out} is empty"
        assert all(isinstance(r, dict) and r for r in rows)
    assert not (ROOT / "bench" / "results" / "e2e-smoke.json").exists(), "a bench ignored FASTFOCAL_BENCH_RESULTS"


def test_launch_count_under_the_interpreter(tmp_path):
    r = _run("launch_count.py", ["--preset", CFG], tmp_path, {"TRITON_INTERPRET": "1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "MB per stream per step" in r.stdout


def test_gpu_only_benches_refuse_cleanly_on_cpu(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA: gpu_quick.sh runs tactics_report for real")
    r = _run("tactics_report.py", ["--preset", CFG, "--max-streams", "2"], tmp_path)
    assert r.returncode != 0 and "needs CUDA" in r.stdout + r.stderr
    assert "Traceback" not in r.stderr
