"""GSPO (report section 4.1, the Thinker's last stage): the policy samples G responses per prompt, rewards
score them (rule functions and a model judge: omni_train/rewards/), and the policy is updated with GSPO's
sequence-level clipped objective (losses/gspo.py) on the group-normalised rewards.

Driven by the rollout loop (``stage.loop=rollout``, loops/rollout.py); per step and data-parallel rank
(``plan``):

1. ``prompts_per_step / dp`` prompts, ``sampling.n`` responses each (one group per prompt);
2. rewards submitted (``stage.rewards``; the judge answers in background threads) while the trainer
   recomputes the old policy's log-probabilities of every response (``stage.gspo.old_logprobs=recompute``,
   one forward without gradient; skipped with one mini-batch, or with ``old_logprobs=rollout``, which
   takes the engine's instead);
3. failed samples (the judge timed out or gave no score) are dropped and counted, never scored 0; groups
   whose rewards are all equal carry no signal and are counted; with ``dynamic_sampling`` they are dropped
   and more prompts drawn (at most ``max_refills`` rounds) until the step has ``prompts_per_step`` groups
   with signal;
4. advantages ``(r - group mean) / (group std + eps)`` (``advantage_scale``), the samples split into
   ``minibatches`` mini-batches, one optimizer update each. The first mini-batch's old log-probabilities
   are the trainer's own, detached (its ratio is exactly 1, logged as ``ratio_first``); later ones use
   the recomputed (or rollout) values.

Rewards are computed on the first tensor-parallel rank and shared. The optional KL to the frozen model
named ``reference`` (``stage.gspo.beta``, k3) is logged whenever that model exists. Logged each step:
``reward`` and ``reward/<function>_mean|_std``, ``reward_failed``, ``groups_no_signal``, ``clipped``
(share of sequences in the clipped region), ``ratio``, ``ratio_first``, ``entropy``, ``kl_reference``,
``logprob_mismatch(_max)`` and ``mismatch_kl`` (trainer vs rollout, first update), with the loop's
rollout tokens/s, response length and time split (``reward_wait_s``, ``old_logprobs_s`` within
``plan_time_s``).
"""

from __future__ import annotations

import time
from functools import partial
from typing import Dict, List

import numpy as np
import torch

from omni_train.losses.gspo import group_advantages, gspo_loss, sequence_index, token_entropy
from omni_train.losses.onpolicy import token_logprobs
from omni_train.metrics import DeviceTimer
from omni_train.rollout import Sample, model_logits
from omni_train.stages import Stage, distill_onpolicy

REFERENCE = "reference"  # the frozen model the KL term compares with
REFERENCE_TIME = DeviceTimer()


def options(cfg):
    g = cfg.stage.gspo
    return {"level": g.level, "epsilon_low": float(g.epsilon_low), "epsilon_high": float(g.epsilon_high),
            "beta": float(g.beta), "kl_bias_correction": bool(g.kl_bias_correction),
            "temperature": float(cfg.stage.rollout.sampling.temperature),
            "chunk_tokens": int(cfg.stage.loss.chunk_tokens)}


build_model = distill_onpolicy.build_model


class ScoredPrompts:
    """The rollout's prompts (data.prompts.PromptSource) with the Rewarder that scores their responses;
    its counters travel in the checkpoint with the prompt cursor."""

    def __init__(self, prompts, rewarder):
        self.prompts, self.rewarder = prompts, rewarder
        self.encoder = prompts.encoder

    def next_prompts(self, count: int):
        return self.prompts.next_prompts(count)

    def state_dict(self):
        return {**self.prompts.state_dict(), "rewards": self.rewarder.state_dict()}

    def load_state_dict(self, state):
        self.prompts.load_state_dict(state)
        if "rewards" in state:
            self.rewarder.load_state_dict(state["rewards"])

    def stats(self) -> Dict[str, float]:
        return self.prompts.stats()


def build_data(cfg, env):
    from omni_train.rewards import Rewarder

    return ScoredPrompts(distill_onpolicy.build_data(cfg, env), Rewarder(cfg.stage.rewards))


# ------------------------------------------------------------------------------------------------ plan
def _requests(samples: List[Sample], encoder, sampling, spec_key: str):
    from omni_train.rewards import RewardRequest
    from omni_train.rollout import stop_ids

    stops = set(stop_ids(encoder, sampling))
    out = []
    for s in samples:
        ids = list(s.token_ids)
        if ids and ids[-1] in stops:
            ids = ids[:-1]
        out.append(RewardRequest(key=f"{s.prompt.key}#{s.index}", question=s.prompt.question,
                                 response=encoder.tokenizer.decode(ids, skip_special_tokens=False),
                                 reference=s.prompt.reference, spec=dict(s.prompt.meta.get(spec_key) or {}),
                                 media=list(s.prompt.media), response_tokens=len(s.token_ids)))
    return out


def _score(loop, samples: List[Sample], need_old: bool):
    """(RewardBatch, old log-probabilities or None) of ``samples``: the rewards on the first tensor-parallel
    rank (the judge working while the trainer recomputes), shared with the group."""
    from megatron.core import parallel_state

    data = loop.session.data
    first = parallel_state.get_tensor_model_parallel_rank() == 0
    requests = _requests(samples, data.encoder, loop.cfg.stage.rollout.sampling, loop.cfg.stage.rewards.spec_key)
    pending = data.rewarder.submit(requests) if first else None
    start = time.perf_counter()
    old = loop.trainer_logprobs(samples) if need_old else None
    old_s = time.perf_counter() - start
    start = time.perf_counter()
    outcome = None
    if first:
        try:
            outcome = pending.result()
        except Exception as e:  # shared, so that every rank of the group stops with it
            outcome = e
    outcome = loop.share(outcome)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome, old, old_s, time.perf_counter() - start


# logged from the step's first update: the trainer vs the rollout before any update of the step
FIRST_ONLY = ("logprob_mismatch", "logprob_mismatch_max", "mismatch_kl", "ratio_first")


def plan(loop, samples: List[Sample]):
    from omni_train.rollout import RolloutPlan

    cfg = loop.cfg
    g, n = cfg.stage.gspo, cfg.stage.rollout.sampling.n
    need_old = g.old_logprobs == "recompute" and g.minibatches > 1
    wanted = loop.prompts_per_rank
    kept: List[List[Sample]] = []  # groups taken into the update
    totals = {"samples": 0, "failed": 0, "groups": 0, "no_signal": 0, "judge_failures": 0, "judge_retries": 0}
    per_function: Dict[str, List[float]] = {}
    rewards_all: List[float] = []
    old_s = wait_s = 0.0
    round_ = 0
    while True:
        batch, old, o_s, w_s = _score(loop, samples, need_old)
        old_s, wait_s = old_s + o_s, wait_s + w_s
        for name, values in batch.per_function.items():
            per_function.setdefault(name, []).extend(values[~np.isnan(values)].tolist())
        totals["samples"] += len(samples)
        totals["failed"] += int(batch.failed.sum())
        totals["judge_failures"] += int(batch.stats.get("reward/judge_failures", 0))
        totals["judge_retries"] += int(batch.stats.get("reward/judge_retries", 0))
        rewards = torch.tensor(batch.total, dtype=torch.float64)
        advantages, std = group_advantages(rewards, n, scale=g.advantage_scale, eps=g.advantage_eps)
        for q in range(len(samples) // n):
            group = range(q * n, (q + 1) * n)
            ok = [i for i in group if not batch.failed[i]]
            signal = len(ok) > 1 and float(np.nanstd(batch.total[ok])) > 0
            totals["groups"] += 1
            totals["no_signal"] += not signal
            if g.dynamic_sampling and not signal:
                continue
            members = []
            for i in ok:
                s = samples[i]
                s.extra["advantage"] = float(advantages[i])
                s.extra["reward"] = float(batch.total[i])
                if old is not None:
                    s.extra["old_logprobs"] = old[i]
                elif g.old_logprobs == "rollout":
                    s.extra["old_logprobs"] = list(s.logprobs)
                members.append(s)
                rewards_all.append(float(batch.total[i]))
            if members:
                kept.append(members)
        if not g.dynamic_sampling or len(kept) >= wanted or round_ >= g.max_refills:
            break
        round_ += 1
        samples = loop.sample(wanted - len(kept), round=round_)
    kept = kept[:wanted]
    flat = [s for group in kept for s in group]
    parts = [list(p) for p in np.array_split(np.arange(len(flat)), g.minibatches)]
    minibatches = [[flat[i] for i in idx] for idx in parts]
    for s in minibatches[0] if g.old_logprobs == "recompute" else []:
        s.extra.pop("old_logprobs", None)  # the first update's ratio: the trainer's own log-probabilities
    fields = ("advantage", "reward") + (("old_logprobs",) if any("old_logprobs" in s.extra for s in flat) else ())
    values = loop.global_means({
        "reward": (sum(rewards_all), len(rewards_all)),
        "reward_failed": (totals["failed"], totals["samples"]),
        "groups_no_signal": (totals["no_signal"], totals["groups"]),
        **{f"reward/{name}_mean": (sum(v), len(v)) for name, v in per_function.items()},
        **{f"reward/{name}_sq": (sum(x * x for x in v), len(v)) for name, v in per_function.items()},
    })
    for name in per_function:
        mean, sq = values[f"reward/{name}_mean"], values.pop(f"reward/{name}_sq")
        values[f"reward/{name}_std"] = float(np.sqrt(max(sq - mean * mean, 0.0)))
    values.update({"refill_rounds": float(round_), "old_logprobs_s": old_s, "reward_wait_s": wait_s,
                   "judge_failures": float(totals["judge_failures"]), "judge_retries": float(totals["judge_retries"]),
                   # this rank's share of failed samples over the run (what max_failure_rate bounds)
                   "reward_failure_rate_run": float(batch.stats.get("reward/failure_rate", 0.0))})
    return RolloutPlan(minibatches, fields, values, first_only=FIRST_ONLY)


# ------------------------------------------------------------------------------------------------ loss
def _loss(logits, batch, ref_logits, level, epsilon_low, epsilon_high, beta, kl_bias_correction, temperature,
          chunk_tokens):
    mask = batch["loss_mask"] > 0
    seq = sequence_index(batch["sample_ids"], mask)
    t = temperature if temperature > 0 else 1.0
    logp = token_logprobs(logits, batch["labels"], temperature=t)
    # the first mini-batch carries none: the old policy is the current one (ratio exactly 1)
    old = batch.get("old_logprobs", logp.detach())
    ref = token_logprobs(ref_logits, batch["labels"], temperature=t) if ref_logits is not None else None
    terms = gspo_loss(logp, old, batch["advantage"], seq, epsilon_low, epsilon_high, level=level,
                      ref_logprobs=ref, beta=beta, kl_bias_correction=kl_bias_correction)
    count = torch.tensor(float(seq.count), device=logp.device)
    tokens = seq.valid.sum().float()
    report = distill_onpolicy.mismatch_report(logp, batch["rollout_logprobs"], seq.valid)
    report.update({
        "loss": torch.stack([terms.loss_sum.detach(), count]),
        "clipped": torch.stack([terms.clipped.sum(), count]),
        "ratio": torch.stack([terms.ratio.sum(), count]),
        "ratio_first": torch.stack([terms.ratio.sum(), count]),
        "ratio_deviation_max": torch.stack([(terms.ratio - 1).abs().max() if seq.count else count * 0, torch.ones_like(count)]),
        "entropy": torch.stack([token_entropy(logits, seq.valid, t, chunk_tokens).sum(), tokens]),
        "advantage": torch.stack([seq.pick(batch["advantage"].to(logp.dtype)).sum(), count]),
    })
    if terms.kl is not None:
        report["kl_reference"] = torch.stack([terms.kl.sum(), count])
    return terms.loss_sum, count.to(torch.int), report


def forward(model, batch, frozen=None, **options):
    logits = model_logits(model, batch)
    ref_logits = None
    if frozen and REFERENCE in frozen:
        with REFERENCE_TIME:
            ref_logits = model_logits(frozen[REFERENCE], batch)
    elif options["beta"]:
        raise KeyError(f"gspo: stage.gspo.beta={options['beta']} needs a frozen model named {REFERENCE!r}")
    return logits, partial(_loss, batch=batch, ref_logits=ref_logits, **options)


STAGE = Stage(build_model=build_model, build_data=build_data, forward=forward, options=options,
              timers={"reference": REFERENCE_TIME}, plan_rollout=plan)
