"""The Talker's DPO (report section 4.2, its third stage: ``talker_dpo``).

Preference pairs for the same context (data/preference_batch.py: the chosen and the rejected spoken answer of one
conversation, codec targets for both). The model is talker_pretrain's (the frozen Thinker conditions the Talker)
plus a frozen **reference Talker**: the stage's starting Talker, held outside the module tree like the Thinker
(no gradient buffer, no optimizer state, eval mode, no_grad), sharing the Thinker's conditioning, and saved in the
stage's checkpoints as ``frozen.reference.talker.*`` so that a resumed run scores against the same reference
whatever became of ``init_from`` (export skips ``frozen.*``).

Per micro-batch: the Thinker runs once over both sides' conversations; the policy and the reference Talker score
every row teacher-forced; ``losses/dpo.py`` sums each sequence's log-probability over codebook 0 or every codebook
(``stage.dpo.codebooks``) and computes trl's DPO loss of the pairs (``stage.dpo``: sigmoid / IPO / robust, beta,
label smoothing, an SFT term on the chosen codes). The loop's loss is the mean over the global batch's pairs (as
trl's over its batch); the SFT term is each micro-batch's chosen NLL per target weighted by its pairs (trl's
batch-wide ratio when a step is one micro-batch). Logged (means over pairs): ``loss_dpo``, ``rewards_chosen``,
``rewards_rejected``, ``rewards_accuracy``, ``rewards_margin``, ``logps_chosen``, ``logps_rejected`` (and
``loss_sft`` per chosen target), as trl names them, besides the context shares of talker_pretrain.

At step 0 the policy is the reference: every reward is 0 and the sigmoid loss is log 2.
"""

from __future__ import annotations

import torch
from torch import nn

from omni_train.data.preference_batch import PreferenceSource
from omni_train.frozen import FrozenModel
from omni_train.losses.dpo import dpo_loss, sequence_logprobs
from omni_train.parallel.process_state import preserved_rng
from omni_train.stages import Stage, talker_pretrain
from omni_train.stages.audio_samples import write_audio_samples
from omni_train.stages.thinker_talker import ThinkerTalker, load_init as load_thinker_talker

REFERENCE = "frozen.reference.talker."


class PreferenceModel(ThinkerTalker):
    """ThinkerTalker + ``reference``: FrozenModel(Talker), not a submodule (see the module docstring)."""

    def __init__(self, base: ThinkerTalker, reference: nn.Module):
        super().__init__(base.thinker.module, base.talker, None if base.code2wav is None else base.code2wav.module)
        object.__setattr__(self, "reference", FrozenModel("reference", reference))
        self.sync_reference()

    def sync_reference(self) -> None:
        """The reference becomes the policy's current weights (at build and after ``init_from``)."""
        self.reference.module.load_state_dict(self.talker.state_dict())

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        state.update(self.reference.module.sharded_state_dict(prefix=f"{prefix}{REFERENCE}",
                                                              sharded_offsets=sharded_offsets, metadata=metadata))
        return state

    def load_state_dict(self, state_dict, strict: bool = True):
        reference = {k[len(REFERENCE):]: v for k, v in state_dict.items() if k.startswith(REFERENCE)}
        if reference or strict:
            self.reference.module.load_state_dict(reference, strict=strict)
        return super().load_state_dict({k: v for k, v in state_dict.items() if not k.startswith(REFERENCE)},
                                       strict=strict)


def build_model(cfg, env, params_dtype, pre_process=True, post_process=True):
    base = talker_pretrain.build_model(cfg, env, params_dtype, pre_process, post_process)
    with preserved_rng():  # the reference's build leaves no trace in the trained model's random stream
        reference = talker_pretrain.build_talker_for(cfg, env, params_dtype, recompute="none")
    return PreferenceModel(base, reference)


def load_init(path, model) -> str:
    """talker_pretrain's hand-off, then the reference becomes the loaded Talker."""
    loaded = load_thinker_talker(path, model)
    getattr(model, "module", model).sync_reference()
    return f"{loaded}; the reference Talker is the loaded Talker"


def build_data(cfg, env):
    talker_pretrain.check_config(cfg)
    trainer = cfg.trainer
    per_rank = trainer.global_batch_size // env.dp_size
    return PreferenceSource(cfg.data, cfg.model.talker, trainer.seq_length, trainer.micro_batch_size,
                            per_rank // trainer.micro_batch_size, env.dp_rank, env.dp_size)


def options(cfg):
    dpo = cfg.stage.dpo
    return dict(beta=dpo.beta, loss_type=dpo.loss_type, label_smoothing=dpo.label_smoothing,
                codebooks=dpo.codebooks, sft_weight=dpo.sft_weight)


def _logprobs(out, codebooks: str):
    layout = out["layout"]
    return sequence_logprobs(out["codec0_logits"], layout["codec0_targets"], codebooks=codebooks,
                             residual_logits=out["residual_logits"], codes=layout["codes"],
                             state_index=layout["state_index"])


def forward(model, batch, frozen=None, *, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
            codebooks: str = "first", sft_weight: float = 0.0):
    module = getattr(model, "module", model)
    samples = module.samples(batch, module.thinker_signals(batch))
    policy = module.talker(samples, return_logits=True)
    with torch.no_grad():
        reference = module.reference.module(samples, return_logits=True)
    logps, counts = _logprobs(policy, codebooks)
    ref_logps, _ = _logprobs(reference, codebooks)
    pairs = batch["pairs"]
    terms = dpo_loss(logps[:pairs], logps[pairs:], ref_logps[:pairs], ref_logps[pairs:], beta, loss_type,
                     label_smoothing, chosen_lengths=counts[:pairs], rejected_lengths=counts[pairs:],
                     sft_weight=sft_weight)
    # the MoE aux loss rides on the policy's activations (megatron's autoscaler); the policy's own CE is unused
    loss_sum = terms.losses.sum()
    if terms.sft_nll is not None:
        loss_sum = loss_sum + pairs * terms.sft_weight * terms.sft_nll.sum() / terms.chosen_tokens.sum()
    count = torch.tensor(pairs, dtype=torch.int, device=loss_sum.device)
    report = {**terms.report(), **talker_pretrain.context_report(batch["context"][:pairs], loss_sum.device)}
    report["loss"] = torch.stack([loss_sum.detach(), loss_sum.new_tensor(float(pairs))])

    def loss_func(output):
        return output, count, report

    return loss_sum, loss_func


STAGE = Stage(build_model=build_model, build_data=build_data, forward=forward, options=options,
              load_init=load_init, finish=write_audio_samples)
