"""The tiny pipeline through the real CLI, shortened: synthetic data made on first use, S1 audio -> S1 vision
-> S2 (interrupted, then resumed by rerunning the command) -> S3 -> SFT -> off-policy distillation ->
on-policy distillation -> GSPO -> export -> generation.

Checks each stage's hand-off, its loss falling, per-modality losses adding up to the loss, the S2/S3
mixtures following their token weights, the skip/resume of a partly finished pipeline, and that the
exported directory loads in transformers.
"""

import json

import pytest
from transformers import AutoTokenizer, Qwen3OmniMoeForConditionalGeneration

from cli import REPO, metrics, run_module
from omni_train.data.packing import MODALITIES

# Per stage: fewer steps and shorter sequences than the README's run.
STAGES = {
    "audio_align": ["trainer.max_steps=4", "stage.phases.0.steps=2", "stage.phases.1.steps=2"],
    "vision_align": ["trainer.max_steps=4", "stage.phases.0.steps=2", "stage.phases.1.steps=2"],
    "general_pretrain": ["trainer.max_steps=5"],
    "long_context": ["trainer.max_steps=3", "trainer.seq_length=1024"],
    "sft": ["trainer.max_steps=3"],
    "distill_offpolicy": ["trainer.max_steps=3"],
    "distill_onpolicy": ["trainer.max_steps=3", "stage.rollout.sampling.max_new_tokens=8"],
    "gspo": ["trainer.max_steps=3", "stage.rollout.prompts_per_step=2"],
}
SHARED = ["trainer.global_batch_size=2", "trainer.micro_batch_size=1", "optim.warmup_steps=1",
          "checkpoint.save_every=2", "pipeline.synth_samples=6", "pipeline.max_new_tokens=4"]


def _stages(stop_general_at=None):
    entries = []
    for name, overrides in STAGES.items():
        extra = [f"trainer.stop_at_step={stop_general_at}"] if name == "general_pretrain" and stop_general_at \
            else []
        quoted = ",".join(f"'{o}'" for o in overrides + extra)
        entries.append(f"{{recipe:tiny/{name},overrides:[{quoted}]}}")
    return f"pipeline.stages=[{','.join(entries)}]"


def _pipeline(cwd, stop_general_at=None):
    """Run from `cwd`: the recipes' relative data/ and runs/ paths land there."""
    return run_module("omni_train.train", ["recipe=tiny/pretrain_pipeline", _stages(stop_general_at), *SHARED],
                      env={"PYTHONPATH": str(REPO)}, cwd=cwd, timeout=900)  # the package, wherever installed


def _falls(records):
    steps = sorted(records)
    return records[steps[-1]]["loss"] < records[steps[0]]["loss"]


@pytest.mark.slow
def test_pipeline_hand_off_resume_export(tmp_path):
    first = _pipeline(tmp_path, stop_general_at=2)
    assert first.returncode == 1, first.stderr[-3000:]
    assert "made synthetic data in data/tiny_pretrain" in first.stdout
    assert "stage general_pretrain stopped before step 5; rerun the same command" in first.stderr
    root = tmp_path / "runs" / "tiny_pretrain"
    assert not (root / "long_context").exists()

    second = _pipeline(tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    out = second.stdout
    assert "made synthetic data" not in out  # made once
    assert "stage audio_align: finished earlier" in out and "stage vision_align: finished earlier" in out
    assert "resumed from runs/tiny_pretrain/general_pretrain/checkpoints/step_00000002 at step 2" in out

    # hand-off: each stage starts from the previous stage's final checkpoint
    handoff = {"vision_align": "audio_align/checkpoints/step_00000004",
               "general_pretrain": "vision_align/checkpoints/step_00000004",
               "long_context": "general_pretrain/checkpoints/step_00000005",
               "sft": "long_context/checkpoints/step_00000003",
               "distill_offpolicy": "sft/checkpoints/step_00000003",
               "distill_onpolicy": "distill_offpolicy/checkpoints/step_00000003",
               "gspo": "distill_onpolicy/checkpoints/step_00000003"}
    logs = first.stdout + out
    for stage, source in handoff.items():
        assert f"initialised model weights from runs/tiny_pretrain/{source}" in logs, stage

    onpolicy = metrics(root / "distill_onpolicy")  # its own samples, scored by the SFT checkpoint
    assert "frozen model 'teacher' from stage:sft" in out
    for r in onpolicy.values():
        assert r["kl_teacher"] > 0 and r["logprob_mismatch_max"] < 1e-4 and r["response_length"] > 0
    gspo = metrics(root / "gspo")  # its own samples, scored by the toy task's reward
    for r in gspo.values():
        assert r["ratio_first"] == 1.0 and r["logprob_mismatch_max"] < 1e-4 and r["reward_failed"] == 0
        assert 0 <= r["reward"] <= 1 and r["updates"] == 2
    for stage in [s for s in STAGES if s not in ("distill_onpolicy", "gspo")]:
        records = metrics(root / stage)
        assert _falls(records), (stage, {s: r["loss"] for s, r in records.items()})
        for r in records.values():  # per-modality losses: a token-weighted split of the loss
            parts = [(r[f"loss_{m}"], r[f"loss_{m}_count"]) for m in MODALITIES if f"loss_{m}" in r]
            assert parts
            mean = sum(loss * n for loss, n in parts) / sum(n for _, n in parts)
            assert abs(mean - r["loss"]) < 1e-6 * max(1.0, r["loss"])  # fp32 sums, other order
    assert {"loss_audio"} <= set(metrics(root / "audio_align")[4])
    assert "loss_text" not in metrics(root / "audio_align")[4]

    # S2's realised token shares follow the report's weights (0.57/0.77/0.82/0.05/0.05)
    last = metrics(root / "general_pretrain")[5]
    weights = {"text": 0.57, "audio_text": 0.77, "image_text": 0.82, "video_text": 0.05, "video_audio": 0.05}
    total = sum(weights.values())
    for i, (name, w) in enumerate(weights.items()):
        assert last[f"data_share_{i}_{name}"] == pytest.approx(w / total, abs=0.08), name

    export = root / "export"
    assert f"exported runs/tiny_pretrain/gspo/checkpoints/step_00000003 -> {export.relative_to(tmp_path)}" \
        in out
    assert "assistant:" in out
    config = json.loads((export / "config.json").read_text())
    assert config["architectures"] == ["Qwen3OmniMoeForConditionalGeneration"]
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = tokenizer("Describe the picture", return_tensors="pt").input_ids
    generated = model.thinker.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 3
