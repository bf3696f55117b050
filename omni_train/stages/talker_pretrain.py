"""The Talker's pretraining (report section 4.2, its first two stages: ``talker_pretrain``, and ``talker_cpt``
at a longer ``trainer.seq_length`` with long speech up-weighted, the same code).

Trains the Talker (backbone, text / hidden projections, code predictor: ``^talker\\.``) on conversations whose
last assistant turn is spoken, with codec targets (data/talker_batch.py: one conversation per row, bad samples
skipped and counted). The Thinker is built beside it in the same module, frozen (stages/thinker_talker.py),
and supplies its conditioning: input embeddings everywhere, the accept layer's states at media placeholders of
user turns. Loss: models/talker/model.py's teacher-forced codebook-0 CE + ``residual_loss_weight`` x residual CE
(+ the MoE aux loss inside the routers), per codebook-0 target over the global batch; logged with
``loss_codec0``, ``loss_residual`` and ``context_<audio|image|video|text>`` (the share of the step's
conversations with that medium in their user turns, none for text; ``_count``: the conversations).

``init_from``: a Thinker checkpoint (the Talker starts from its initialisation) or one holding both (an
import, or an earlier Talker stage).
"""

from __future__ import annotations

import dataclasses

import torch

from omni_train.data.shards import chat_encoder
from omni_train.data.talker_batch import CONTEXT_KINDS, SpeechSource, talker_with_tokenizer_ids
from omni_train.models.talker.code2wav import build_code2wav
from omni_train.models.talker.model import build_talker
from omni_train.parallel.process_state import preserved_rng
from omni_train.stages import Stage, multimodal_pretrain
from omni_train.stages.audio_samples import write_audio_samples
from omni_train.stages.thinker_talker import ThinkerTalker, load_init

TALKER_SEED_OFFSET = 104729  # the Talker's init draws apart from the Thinker's


def check_config(cfg) -> None:
    if cfg.model.talker is None:
        raise ValueError("model.talker: the Talker's stages need a model with a Talker (e.g. model=tiny_omni_talker)")
    if cfg.data.name != "shards" or cfg.data.tokenizer is None:
        raise ValueError("data: the Talker's stages read conversations with speech from shards (data=shards, "
                         "data.tokenizer set)")


def build_model(cfg, env, params_dtype, pre_process=True, post_process=True):
    check_config(cfg)
    # the frozen Thinker runs under no_grad: nothing to recompute
    thinker_cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, recompute="none"))
    thinker = multimodal_pretrain.build_model(thinker_cfg, env, params_dtype, pre_process, post_process)
    talker = build_talker_for(cfg, env, params_dtype, cfg.trainer.recompute)
    code2wav = None
    if cfg.model.code2wav is not None:
        with preserved_rng():
            torch.manual_seed(cfg.model.code2wav.seed)
            code2wav = build_code2wav(cfg.model.code2wav.hf_config(), device=env.device, dtype=params_dtype)
    if env.is_main:
        print(f"frozen Thinker beside the Talker: {sum(p.numel() for p in thinker.parameters()):,} parameters "
              "(no gradient buffer, no optimizer state)", flush=True)
    return ThinkerTalker(thinker, talker, code2wav)


def build_talker_for(cfg, env, params_dtype, recompute: str):
    """The stage's Talker, seeded apart from the Thinker, with the data tokenizer's ids."""
    talker_cfg = talker_with_tokenizer_ids(cfg.model.talker, chat_encoder(cfg.data))
    torch.manual_seed(cfg.trainer.seed + TALKER_SEED_OFFSET)
    return build_talker(talker_cfg, cfg.parallel, device=env.device, params_dtype=params_dtype, recompute=recompute)


def build_data(cfg, env):
    check_config(cfg)
    trainer = cfg.trainer
    per_rank = trainer.global_batch_size // env.dp_size
    return SpeechSource(cfg.data, cfg.model.talker, trainer.seq_length, trainer.micro_batch_size,
                        per_rank // trainer.micro_batch_size, env.dp_rank, env.dp_size)


def context_report(context, device):
    """{context_<kind>: (conversations with it in their user turns, conversations)}; text: none of them."""
    n = float(len(context))
    report = {f"context_{kind}": sum(kind in kinds for kinds in context) for kind in CONTEXT_KINDS}
    report["context_text"] = sum(not kinds for kinds in context)
    return {name: torch.tensor([float(v), n], device=device) for name, v in report.items()}


def forward(model, batch, frozen=None):
    out = model(batch)
    codec0 = out["report"]["loss_codec0"]
    report = {**out["report"], **context_report(batch["context"], codec0.device)}

    def loss_func(loss):
        # model.py's loss is a mean per codebook-0 target (plus the weighted residual mean): times their
        # number it is the micro-batch's sum, which the loop divides by the global batch's targets
        targets = codec0[1]
        loss_sum = loss * targets
        return loss_sum, targets.to(torch.int), {"loss": torch.stack([loss_sum.detach(), targets]), **report}

    return out["loss"], loss_func


STAGE = Stage(build_model=build_model, build_data=build_data, forward=forward, load_init=load_init,
              finish=write_audio_samples)
