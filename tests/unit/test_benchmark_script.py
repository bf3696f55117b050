"""benchmarks/thinker_throughput.py on CPU with the tiny config: both sides train, figures are sane."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "thinker_throughput.py"
# The script's --tiny sizes, written out again so that the FLOP count is checked against the formula
# rather than against the function that computes it.
V, H, L, HEADS, GROUPS, D, E, K, F, S, B = 512, 64, 2, 4, 2, 16, 8, 2, 32, 32, 2


def expected_flops_per_token(seq: int = S) -> float:
    q, kv = HEADS * D, GROUPS * D
    per_layer = H * (2 * q + 2 * kv) + 3 * H * K * F + H * E
    return 6.0 * (L * per_layer + H * V) + 6.0 * L * seq * q


def expected_parameters() -> int:
    per_layer = H * (HEADS + 2 * GROUPS) * D + HEADS * D * H + 2 * D + 2 * H + E * H + E * 3 * H * F
    return L * per_layer + 2 * V * H + H


# The module's three runs of the script with --tiny on CPU, 1 warm-up and 2 timed steps: (--which, other
# arguments, sequence length, timeout in seconds when run alone).
RUNS = {
    "text": ("ours,hf_eager", [], S, 170),
    "omni": ("ours_omni,hf_omni_grouped_mm", [], 64, 110),
    "accumulation": ("ours,hf_eager", ["--micro-batches", "2"], S, 170),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The RUNS, started together, one thread each: each variant runs in its own interpreter, which spends
    most of its time importing on one core, so on 2 cores the three runs overlap."""
    started = {}
    for name, (which, extra, seq, _) in RUNS.items():
        log_dir = tmp_path_factory.mktemp(f"bench_{name}")
        cmd = [sys.executable, str(SCRIPT), "--tiny", "--layers", str(L), "--seq-length", str(seq),
               "--micro-batch", str(B), "--steps", "2", "--warmup", "1", "--which", which, *extra,
               "--json", str(log_dir / "bench.json"), "--log-dir", str(log_dir)]
        with open(log_dir / "stdout", "w") as out, open(log_dir / "stderr", "w") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=REPO,
                                    env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
        started[name] = (proc, log_dir)
    yield started
    for proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_tiny(runs, name: str):
    """(The JSON report, the stdout) of RUNS[name]; the timeouts of all three: they share the cores."""
    proc, log_dir = runs[name]
    proc.wait(timeout=sum(run[3] for run in RUNS.values()))
    stdout, stderr = (log_dir / "stdout").read_text(), (log_dir / "stderr").read_text()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return json.loads((log_dir / "bench.json").read_text()), stdout


def test_tiny_benchmark_on_cpu(runs):
    report, stdout = run_tiny(runs, "text")
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
    assert "| ours" in stdout and "| hf_eager" in stdout


def tiny_omni_towers():
    """tiny_omni's towers (conf/model/tiny_omni.yaml) as the stage builds them, at the script's LM width."""
    from omegaconf import OmegaConf
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
        Qwen3OmniMoeAudioEncoder, Qwen3OmniMoeVisionEncoder)

    from omni_train.config import compose
    from omni_train.models.thinker.hf_config import hf_thinker_config

    model = OmegaConf.to_object(compose(["model=tiny_omni", f"model.thinker.hidden_size={H}"])).model.thinker
    ids = dict(audio_pad=1, image_pad=2, video_pad=3, vision_start=4, audio_start=5)
    hf = Qwen3OmniMoeThinkerConfig(**hf_thinker_config(model, ids))
    return model, Qwen3OmniMoeAudioEncoder(hf.audio_config), Qwen3OmniMoeVisionEncoder(hf.vision_config)


def test_tiny_omni_benchmark_on_cpu(runs):
    """ours_omni (the trainer, stage multimodal_pretrain) and transformers' Thinker with the same towers on
    sequences of text + a 100-frame audio clip + a 64 px image: tower FLOPs counted, figures consistent."""
    from omni_train.metrics import audio_tower_flops, vision_tower_flops

    seq = RUNS["omni"][2]
    report, stdout = run_tiny(runs, "omni")
    model, audio, vision = tiny_omni_towers()
    omni = report["omni"]
    assert omni["flavor"] == "tiny_omni"
    media = omni["media_per_sequence"]
    # 100 frames: one full window, 13 tokens; 64 px: a 4 x 4 patch grid merged 2 x 2, 4 tokens
    assert (media["audio_frames"], media["audio_tokens"]) == (100, 13)
    assert (media["image_grid_thw"], media["image_tokens"]) == ([1, 4, 4], 4)
    per_sequence = audio_tower_flops(model, 100) + vision_tower_flops(model, (1, 4, 4))
    assert omni["tower_flops_per_step"] == B * per_sequence > 0
    # the LM's FLOPs are those of the text variants: the same LM on the same number of tokens
    lm_flops = expected_flops_per_token(seq)
    assert report["flops_per_token"] == lm_flops
    tower_parameters = sum(p.numel() for p in audio.parameters()) + sum(p.numel() for p in vision.parameters())
    by_name = {r["variant"]: r for r in report["results"]}
    for name, r in by_name.items():
        assert r["status"] == "ok", (name, r)
        f = r["figures"]
        assert f["mfu"] is None and f["lm_mfu"] is None and f["total_mfu"] is None  # no peak on CPU
        assert f["tower_tflops"] > 0
        assert math.isclose(f["tower_tflops"], omni["tower_flops_per_step"] / f["step_s"] / 1e12)
        assert math.isclose(f["total_tflops"], f["tflops"] + f["tower_tflops"])
        assert math.isclose(f["tflops"], f["tokens_per_s"] * lm_flops / 1e12)
        # the whole Thinker the stage builds: the LM of the text variants plus tiny_omni's towers
        assert r["tower_parameters"] == tower_parameters, name
        assert r["parameters"] == expected_parameters() + tower_parameters, name
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"]), (name, r["losses"])
        assert abs(r["losses"][0] - math.log(V)) < 0.5, (name, r["losses"])
    assert by_name["ours_omni"]["master_weights"] is True
    assert set(report["ratios"]) == {"ours_omni/hf_omni_grouped_mm"}
    assert "| ours_omni" in stdout and "omni (tiny_omni towers)" in stdout


def test_gradient_accumulation_on_cpu(runs):
    """--micro-batches 2: both sides take two micro-batches per optimizer step; tokens per step and the
    figures count both; the first step's loss (the mean over its two micro-batches) is the same model's."""
    report, _ = run_tiny(runs, "accumulation")
    assert report["tokens_per_step"] == 2 * B * S
    for r in report["results"]:
        assert r["status"] == "ok", r
        assert math.isclose(r["figures"]["tokens_per_s"] * r["figures"]["step_s"], 2 * B * S, rel_tol=1e-9)
        assert abs(r["losses"][0] - math.log(V)) < 0.3, r["losses"]
