"""On-policy distillation through the real CLI: the tiny student (freshly initialised) samples its own
responses and moves toward a teacher: the off-policy distillation run's final checkpoint (10 steps from the
student's own first weights, tests/posttrain/conftest.py): kl_teacher falls clearly; the
trainer's log-probabilities equal the rollout's; a run resumed from a mid-stage checkpoint repeats the
uninterrupted run's losses bit for bit. And the recipe errors that must stop a run before it starts."""

import json

import pytest

from cli import metrics, omni_train
from omni_train.config import ConfigError, compose
from omni_train.loops import check_stage
from tests.integration.test_multimodal_stage import _rerun_from


def _overrides(posttrain_root, teacher, run_dir, *extra):
    return ["recipe=tiny/distill_onpolicy", "init_from=null", f"run_dir={run_dir}",
            f"data.datasets=[{{path: {posttrain_root / 'sft'}, weight: 1.0}}]",
            f"data.tokenizer={posttrain_root / 'tokenizer'}",
            f"stage.frozen_models=[{{name: teacher, source: {teacher}}}]", *extra]


def test_kl_to_the_teacher_falls_and_a_resumed_run_repeats_it(posttrain_root, offpolicy_run, tmp_path):
    teacher = offpolicy_run[0] / "checkpoints"
    run_dir = tmp_path / "onpolicy"
    # prompts of the conversations the teacher was distilled on: what it learned there, the student learns
    overrides = _overrides(posttrain_root, teacher, run_dir, "trainer.max_steps=6", "checkpoint.save_every=3",
                           f"data.datasets=[{{path: {posttrain_root / 'distill'}, weight: 1.0}}]")
    proc = omni_train(overrides)
    assert "frozen model 'teacher'" in proc.stdout
    straight = metrics(run_dir)
    kl = [straight[s]["kl_teacher"] for s in range(1, 7)]
    assert kl[-1] < 0.6 * kl[0], kl
    for record in straight.values():
        assert record["logprob_mismatch_max"] < 1e-4  # fp32: trainer and rollout agree
        assert record["rollout_tokens_per_s"] > 0 and 0 < record["response_length"] <= 16
        assert record["kl_teacher_count"] == record["logprob_mismatch_count"] > 0
    _rerun_from(run_dir, 3)
    omni_train(overrides)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6, 4, 5, 6]
    for first, again in zip(lines[3:6], lines[6:]):
        for key in ("loss", "kl_teacher", "grad_norm", "response_length", "logprob_mismatch"):
            assert again[key] == first[key], (first["step"], key)


def test_megatron_backend_trains_on_its_own_samples(posttrain_root, sharp_thinker, tmp_path):
    """backend=megatron: the trained model decodes its own samples (megatron-core's KV cache, no copy), text
    prompts only (media prompts skipped and counted); the trainer's log-probabilities equal the engine's."""
    _, teacher = sharp_thinker
    run_dir = tmp_path / "megatron"
    omni_train(_overrides(posttrain_root, teacher, run_dir, "stage.rollout.backend=megatron",
                          "stage.loss.text_prompts_only=true", "trainer.max_steps=2", "checkpoint.save_every=10"))
    records = metrics(run_dir)
    for record in records.values():
        assert record["logprob_mismatch_max"] < 1e-4 and record["response_length"] > 0
        assert record["rollout_sync_ms"] < 5  # nothing is copied
        assert record.get("prompts_text", 0) > 0 and "prompts_audio" not in record and "prompts_image" not in record
    assert records[2]["prompts_skipped"] > 0  # the media prompts of the SFT set


def _check(overrides):
    check_stage(compose(overrides))


def test_recipe_errors_name_the_key(posttrain_root, sharp_thinker, tmp_path):
    _, teacher = sharp_thinker
    base = _overrides(posttrain_root, teacher, tmp_path / "run")
    _check(base)
    cases = [
        (["stage.frozen_models=[]"], "stage.frozen_models"),
        (["stage.loss.divergence=kl"], "stage.loss.divergence"),
        (["stage.loss.beta=1.5"], "stage.loss.beta"),
        (["stage.rollout.sampling.top_p=0"], "stage.rollout.sampling.top_p"),
        (["stage.rollout.prompts_per_step=0"], "stage.rollout.prompts_per_step"),
        (["stage.loop=supervised"], "stage.loop"),
        (["stage.rollout.backend=megatron"], "stage.loss.text_prompts_only"),  # it answers text only
        (["stage.rollout.backend=megatron", "stage.loss.text_prompts_only=true", "parallel.ep=2"], "parallel.ep"),
    ]
    for extra, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            _check([*base, *extra])
