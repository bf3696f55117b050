"""GSPO through the real CLI on the toy task of recipes/tiny/gspo.yaml ("say the digit N", text prompts
and the same words beside an audio clip or a picture): the mean reward rises clearly from a distilled
tiny Thinker; every step's first update has a ratio of exactly 1 and the trainer's log-probabilities
equal the rollout's; a run resumed mid-stage repeats the uninterrupted one bit for bit. A model judge
served over the OpenAI protocol that times out or answers no score for some samples: the run completes,
failures are counted and never scored; past the failure threshold the run stops naming the key. Dynamic
sampling draws more prompts when groups carry no signal. Recipe errors stop a run before it starts."""

import json
import time

import numpy as np
import pytest

from cli import metrics, omni_train
from omni_train.config import ConfigError, compose
from omni_train.loops import check_stage
from tests.integration.test_multimodal_stage import _rerun_from
from tests.openai_server import OpenAIServer
from tests.posttrain.test_rewards import judge_dir  # noqa: F401  (the tiny judge model the server loads)

REWARD = "reward/data_pipelines.posttrain_synth:say_digit_reward_mean"


def _overrides(posttrain_root, run_dir, init, *extra):
    return ["recipe=tiny/gspo", f"init_from={init}", f"run_dir={run_dir}",
            f"data.datasets=[{{path: {posttrain_root / 'gspo'}, weight: 1.0}}]",
            f"data.tokenizer={posttrain_root / 'tokenizer'}", *extra]


@pytest.mark.slow
def test_reward_rises_and_a_resumed_run_repeats_it(posttrain_root, offpolicy_run, tmp_path):
    init = offpolicy_run[0] / "checkpoints"
    run_dir = tmp_path / "gspo"
    overrides = _overrides(posttrain_root, run_dir, init)
    omni_train(overrides)
    straight = metrics(run_dir)
    reward = [straight[s]["reward"] for s in range(1, 17)]
    assert np.mean(reward[-4:]) > 3 * np.mean(reward[:3]) + 0.05, reward
    for record in straight.values():
        assert record["ratio_first"] == 1.0  # the first update of a rollout batch: the policy that sampled
        assert record["logprob_mismatch_max"] < 1e-4  # fp32: trainer and rollout agree
        assert record["updates"] == 2 and record["reward_failed"] == 0
        assert record[REWARD] == record["reward"]  # one reward function
        assert 0 < record["response_length"] <= 3 and record["rollout_tokens_per_s"] > 0
    assert any(record["ratio"] != 1.0 for record in straight.values())  # the second update moved off 1
    for kind in ("text", "audio", "image"):  # the same task asked beside an audio clip or a picture
        assert sum(record.get(f"prompts_{kind}", 0) for record in straight.values()) > 0, kind
    _rerun_from(run_dir, 8)
    omni_train(overrides)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 17)) + list(range(9, 17))
    for first, again in zip(lines[8:16], lines[16:]):
        for key in ("loss", "reward", "grad_norm", "entropy", "ratio", "clipped", "response_length"):
            assert again[key] == first[key], (first["step"], key)


class FaultyJudge(OpenAIServer):
    """A judge over the real protocol: "Score: 7" for most answers; for prompts about the digit "three" a
    reply with no score, for "four" a wait longer than the client's timeout."""

    def complete(self, body):
        text = json.dumps(body["messages"])
        if "digit four" in text:
            time.sleep(0.6)
        reply = "I cannot grade this." if "digit three" in text else "Fine. Score: 7"
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                  "finish_reason": "stop"}]}


def test_a_failing_judge_is_counted_never_scored(posttrain_root, judge_dir, tmp_path):  # noqa: F811
    with FaultyJudge(judge_dir, served_model="judge") as server:
        judge = ["stage.rewards.functions=[]", "stage.rewards.judge.backend=openai",
                 f"stage.rewards.judge.url={server.url}", "stage.rewards.judge.model=judge",
                 "stage.rewards.judge.timeout_s=0.25", "stage.rewards.judge.retries=1",
                 "stage.rewards.judge.backoff_s=0.05", "trainer.max_steps=2", "checkpoint.save_every=10",
                 "stage.rollout.prompts_per_step=4", "trainer.global_batch_size=4"]
        run_dir = tmp_path / "judged"
        omni_train(_overrides(posttrain_root, run_dir, "null", *judge, "stage.rewards.max_failure_rate=0.9"))
        records = metrics(run_dir)
        failed = sum(r["reward_failed"] for r in records.values())
        assert failed > 0 and sum(r["judge_failures"] for r in records.values()) > 0
        assert sum(r["judge_retries"] for r in records.values()) > 0  # the timeouts were tried again
        judged = [r for r in records.values() if r["reward/judge_mean"] == r["reward/judge_mean"]]  # not NaN
        assert judged  # a step whose prompts all failed or named other functions has no judge mean
        for record in judged:
            # every judged sample that counts scored 7 / 10: no failed one was scored 0 (samples whose own
            # spec names other functions are scored by those)
            assert record["reward/judge_mean"] == pytest.approx(0.7) and record["reward/judge_std"] < 1e-6
        # the same judge with a strict threshold: the run stops and says why
        proc = omni_train(_overrides(posttrain_root, tmp_path / "strict", "null", *judge,
                                     "stage.rewards.max_failure_rate=0.01",
                                     "stage.rewards.min_samples_for_failure_rate=8"), check=False)
        assert proc.returncode != 0
        assert "stage.rewards.max_failure_rate=0.01" in proc.stderr, proc.stderr[-2000:]


def test_dynamic_sampling_refills_groups_without_signal(posttrain_root, tmp_path):
    run_dir = tmp_path / "dynamic"
    # a fresh model rarely says a digit: most groups score 0 throughout and are replaced
    omni_train(_overrides(posttrain_root, run_dir, "null", "stage.gspo.dynamic_sampling=true",
                          "stage.gspo.max_refills=2", "trainer.max_steps=2", "checkpoint.save_every=10"))
    records = metrics(run_dir)
    assert any(r["refill_rounds"] > 0 for r in records.values())
    assert records[2]["prompts_seen"] > 2 * 8  # more prompts than two steps' worth were drawn


def _check(overrides):
    check_stage(compose(overrides))


def test_recipe_errors_name_the_key(posttrain_root, tmp_path):
    base = _overrides(posttrain_root, tmp_path / "run", "null")
    _check(base)
    cases = [
        (["stage.gspo.level=tokens"], "stage.gspo.level"),
        (["stage.gspo.old_logprobs=teacher"], "stage.gspo.old_logprobs"),
        (["stage.gspo.advantage_scale=global"], "stage.gspo.advantage_scale"),
        (["stage.gspo.epsilon_low=-0.1"], "stage.gspo.epsilon_low"),
        (["stage.gspo.minibatches=0"], "stage.gspo.minibatches"),
        (["stage.gspo.minibatches=65"], "stage.gspo.minibatches"),
        (["stage.rollout.sampling.n=1"], "stage.rollout.sampling.n"),
        (["stage.gspo.beta=0.04"], "stage.gspo.beta"),
        (["parallel.cp=2"], "parallel.cp"),
        (["stage.rewards.functions=[{name: no_such_reward}]"], "stage.rewards.functions[0].name"),
        (["stage.rewards.judge.backend=openai"], "stage.rewards.judge"),
        (["stage.loop=supervised"], "stage.loop"),
    ]
    for extra, key in cases:
        with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
            _check(base + extra)
    # a reference model makes beta legal
    _check(base + ["stage.gspo.beta=0.04", "stage.frozen_models=[{name: reference, source: init}]"])
