"""On-policy distillation (report section 4.1, strong-to-weak, second phase): the student (the Thinker being
trained) samples responses to prompts; a frozen teacher scores each whole sequence in one forward; the
student's per-token distribution on its own samples is pulled toward the teacher's.

Driven by the rollout loop (``stage.loop=rollout``, loops/rollout.py): prompts come from shards
(data.prompts), responses from the rollout engine (rollout/), the teacher is the frozen model named
``teacher`` (``stage.frozen_models``: a Qwen3 dense or MoE text LLM, or a Qwen3-Omni Thinker, from a
Hugging Face directory ``hf:<dir>``, a checkpoint or a stage). The loss (``stage.loss``,
losses/onpolicy.py), per response token, averaged over the response tokens of the global batch:

- ``reverse_kl`` (default) KL(student || teacher), ``forward_kl`` KL(teacher || student), ``jsd``
  generalised JSD with ``beta``: over the full vocabulary, chunked, split over tensor-parallel ranks;
- ``sampled_token``: the sampled token's log-ratio ``log p_teacher - log p_student`` as a per-token
  advantage of an importance-weighted policy gradient (no full-vocabulary term).

Both models' logits are divided by ``stage.loss.temperature``. Vocabularies that share ids but differ in
size are compared over the shared ids. Logged: ``loss``, ``kl_teacher`` (the divergence per token; for
``sampled_token`` the sampled estimate of the reverse KL), ``logprob_mismatch`` / ``logprob_mismatch_max``
(|trainer - rollout| log-probability of the sampled tokens) and ``mismatch_kl`` (the k3 estimate of
KL(rollout || trainer) those differences imply), with the rollout loop's own values.
"""

from __future__ import annotations

from functools import partial

import torch

from omni_train.losses.onpolicy import full_vocab_divergence, sampled_token_advantage, sampled_token_loss, token_logprobs
from omni_train.metrics import DeviceTimer
from omni_train.rollout import model_logits
from omni_train.rollout.teacher import TEACHER  # the frozen model's name
from omni_train.stages import Stage, multimodal_pretrain, text_pretrain

TEACHER_TIME = DeviceTimer()  # the teacher's forwards of a step (logged as teacher_time_s)


def options(cfg):
    loss = cfg.stage.loss
    return {"divergence": loss.divergence, "beta": float(loss.beta), "temperature": float(loss.temperature),
            "chunk_tokens": int(loss.chunk_tokens),
            "sampling_temperature": float(cfg.stage.rollout.sampling.temperature)}


def build_model(cfg, env, params_dtype, pre_process=True, post_process=True):
    """The Thinker with its towers (model.thinker.towers), else its LM alone: on-policy distillation of
    text prompts needs no towers (and the LM alone may then be split over tensor-parallel ranks)."""
    build = multimodal_pretrain.build_model if cfg.model.thinker.towers else text_pretrain.build_model
    return build(cfg, env, params_dtype, pre_process, post_process)


def build_data(cfg, env):
    from megatron.core import parallel_state

    from omni_train.data.prompts import PromptSource
    from omni_train.data.shards import chat_encoder

    if cfg.data.name != "shards":
        raise ValueError("data.name: distill_onpolicy reads its prompts from shards (data=shards)")
    return PromptSource(cfg.data, chat_encoder(cfg.data), cfg.stage.rollout.max_prompt_tokens,
                        parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size(),
                        text_only=cfg.stage.loss.text_prompts_only or not cfg.model.thinker.towers)


def _shared(student: torch.Tensor, teacher: torch.Tensor):
    """Both logits over the ids the two vocabularies share (tp = 1 slices the larger one)."""
    if student.shape[-1] == teacher.shape[-1]:
        return student, teacher
    from megatron.core import parallel_state

    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        raise ValueError(f"student and teacher vocabularies differ ({student.shape[-1]} vs {teacher.shape[-1]} "
                         f"ids per tensor-parallel rank): comparing them over shared ids needs parallel.tp=1")
    shared = min(student.shape[-1], teacher.shape[-1])
    return student[..., :shared], teacher[..., :shared]


def mismatch_report(trainer: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor):
    """The trainer's vs the rollout's log-probabilities of the sampled tokens [B, L] where ``mask``: mean and
    max |difference| and the k3 estimate of KL(rollout || trainer) they imply, E[exp(d) - d - 1] with
    d = trainer - rollout (LossReport entries)."""
    count = mask.sum().float()
    diff = (trainer.detach() - rollout).masked_fill(~mask, 0.0)
    return {
        "logprob_mismatch": torch.stack([diff.abs().sum(), count]),
        "logprob_mismatch_max": torch.stack([diff.abs().max(), torch.ones_like(count)]),
        "mismatch_kl": torch.stack([(torch.expm1(diff) - diff).masked_fill(~mask, 0.0).sum(), count]),
    }


def _loss(logits, batch, teacher_logits, divergence, beta, temperature, chunk_tokens, sampling_temperature):
    mask = batch["loss_mask"] > 0
    count = mask.sum().float()
    labels = batch["labels"]
    student, teacher = _shared(logits, teacher_logits)
    # the trainer's log-probabilities of the sampled tokens, at the rollout's temperature: mismatch
    trainer = token_logprobs(logits, labels, temperature=sampling_temperature if sampling_temperature > 0 else 1.0)
    report = mismatch_report(trainer, batch["rollout_logprobs"], mask)
    if divergence == "sampled_token":
        student_lp = token_logprobs(student, labels, temperature=temperature)
        teacher_lp = token_logprobs(teacher, labels, temperature=temperature)
        advantage = sampled_token_advantage(student_lp, teacher_lp)
        rollout = batch["rollout_logprobs"] if temperature == (sampling_temperature or 1.0) else student_lp.detach()
        per_token = sampled_token_loss(student_lp, rollout, advantage, mask)
        kl = (student_lp.detach() - teacher_lp).masked_fill(~mask, 0.0)
    else:
        per_token = full_vocab_divergence(student, teacher, mask, divergence=divergence, beta=beta,
                                          temperature=temperature, chunk_tokens=chunk_tokens)
        kl = per_token.detach()
    loss_sum = per_token.masked_fill(~mask, 0.0).sum()
    report["loss"] = torch.stack([loss_sum.detach(), count])
    report["kl_teacher"] = torch.stack([kl.masked_fill(~mask, 0.0).sum(), count])
    return loss_sum, count.to(torch.int), report


def forward(model, batch, frozen=None, divergence="reverse_kl", beta=0.5, temperature=1.0, chunk_tokens=1024,
            sampling_temperature=1.0):
    if not frozen or TEACHER not in frozen:
        raise KeyError(f"distill_onpolicy: no frozen model named {TEACHER!r} (stage.frozen_models)")
    logits = model_logits(model, batch)
    with TEACHER_TIME:
        teacher_logits = model_logits(frozen[TEACHER], batch)
    return logits, partial(_loss, batch=batch, teacher_logits=teacher_logits, divergence=divergence, beta=beta,
                           temperature=temperature, chunk_tokens=chunk_tokens,
                           sampling_temperature=sampling_temperature)


STAGE = Stage(build_model=build_model, build_data=build_data, forward=forward, options=options,
              timers={"teacher": TEACHER_TIME})
