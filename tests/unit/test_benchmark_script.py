"""benchmarks/thinker_throughput.py on CPU with the tiny config: both sides train, figures are sane."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "thinker_throughput.py"
# The script's --tiny sizes, written out again so that the FLOP count is checked against the formula
# rather than against the function that computes it.
V, H, L, HEADS, GROUPS, D, E, K, F, S, B = 512, 64, 2, 4, 2, 16, 8, 2, 32, 32, 2


def expected_flops_per_token() -> float:
    q, kv = HEADS * D, GROUPS * D
    per_layer = H * (2 * q + 2 * kv) + 3 * H * K * F + H * E
    return 6.0 * (L * per_layer + H * V) + 6.0 * L * S * q


def expected_parameters() -> int:
    per_layer = H * (HEADS + 2 * GROUPS) * D + HEADS * D * H + 2 * D + 2 * H + E * H + E * 3 * H * F
    return L * per_layer + 2 * V * H + H


def test_tiny_benchmark_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--tiny", "--layers", str(L), "--seq-length", str(S),
           "--micro-batch", str(B), "--steps", "2", "--warmup", "1", "--which", "ours,hf_eager",
           "--json", str(out), "--log-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, cwd=REPO,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["flops_per_token"] == expected_flops_per_token()
    assert report["tokens_per_step"] == B * S
    assert report["peak_flops"] is None  # no MFU on CPU
    by_name = {r["variant"]: r for r in report["results"]}
    assert set(by_name) == {"ours", "hf_eager"}
    for name, r in by_name.items():
        assert r["status"] == "ok", (name, r)
        assert len(r["step_times_s"]) == 2
        figures = r["figures"]
        for key in ("tokens_per_s", "tflops", "step_s"):
            assert math.isfinite(figures[key]) and figures[key] > 0, (name, key, figures)
        assert figures["mfu"] is None
        assert math.isclose(figures["tokens_per_s"] * figures["step_s"], B * S, rel_tol=1e-9)
        assert math.isclose(figures["tflops"], figures["tokens_per_s"] * report["flops_per_token"] / 1e12)
        assert math.isfinite(r["peak_memory_gib"]) and r["peak_memory_gib"] > 0
        # same model on both sides: same LM parameter count, loss at init near log(vocab)
        assert r["parameters"] == expected_parameters(), name
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
        assert abs(r["losses"][0] - math.log(V)) < 0.3, (name, r["losses"])
    assert by_name["hf_eager"]["experts_implementation"] == "eager"
    assert report["ratios"]["ours/hf_eager"] == (
        by_name["ours"]["figures"]["tokens_per_s"] / by_name["hf_eager"]["figures"]["tokens_per_s"])
    assert "| ours" in proc.stdout and "| hf_eager" in proc.stdout
