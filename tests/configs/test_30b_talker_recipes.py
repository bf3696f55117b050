"""The Talker's full-scale recipes (recipes/qwen3_omni_30b_a3b/{talker_pretrain, talker_cpt, talker_dpo,
speaker_finetune}): each composes and validates for the 8-GPU nodes it is written for, without its data, weights
or the stages' code; its dry run plans the frozen Thinker, the trained Talker (or, for speaker_finetune, the
subset it trains) and, for talker_dpo, the frozen reference Talker, and the plan fits the H200 it names. The
reference's bytes are checked against the Talker built on the meta device, not against the planner's table."""

import dataclasses
import re

import pytest
import torch
from omegaconf import OmegaConf

from omni_train.config import CONF_DIR, compose, validate_config
from omni_train.config.schema import ParallelConfig
from omni_train.loops import check_stage
from omni_train.planning.dry_run import print_dry_run
from omni_train.planning.talker_memory import estimate_talker_memory, talker_run

# recipe: Talker positions per row (CPT twice the pretraining length; DPO and the speaker at the pretraining one)
SEQ_LENGTHS = dict(talker_pretrain=8192, talker_cpt=16384, talker_dpo=8192, speaker_finetune=8192)
TALKER_RECIPES = list(SEQ_LENGTHS)
H200_GB = 141


def _compose(recipe, *overrides):
    return compose([f"recipe=qwen3_omni_30b_a3b/{recipe}", "dry_run=true", *overrides])


@pytest.fixture(scope="module")
def built_talker():
    """{name: numel} of our 30B Talker (models/talker/model.py) built on the meta device at ep = 1: built with
    one backbone layer (0.4 s, not 6 s for 20) whose parameters stand for each of the 20 layers'."""
    from omni_train.models.talker.model import build_talker
    from omni_train.parallel.setup import init_parallel, shutdown_parallel

    talker = OmegaConf.to_object(compose(["model=qwen3_omni_30b_a3b_talker"])).model.talker
    init_parallel(ParallelConfig(), torch.device("cpu"), seed=0)
    try:
        with torch.device("meta"):
            model = build_talker(dataclasses.replace(talker, num_layers=1), ParallelConfig(),
                                 device=torch.device("meta"), params_dtype=torch.bfloat16)
        built = {name: p.numel() for name, p in model.named_parameters()}
    finally:
        shutdown_parallel()
    layer = "backbone.decoder.layers.0."
    out = {name: n for name, n in built.items() if not name.startswith(layer)}
    for i in range(talker.num_layers):
        out.update({name.replace(layer, f"backbone.decoder.layers.{i}."): n for name, n in built.items()
                    if name.startswith(layer)})
    return out


def _per_rank(built, ep, keep=lambda name: True):
    """Parameters one rank holds at ep: every routed expert weight split over ep, the rest replicated."""
    return sum(n // ep if ".mlp.experts." in name else n for name, n in built.items() if keep(name))


def _estimate(cfg, **run_changes):
    run = dataclasses.replace(talker_run(cfg.stage), **run_changes)
    (estimate,) = estimate_talker_memory(cfg.model.talker, cfg.model.thinker, cfg.parallel, cfg.trainer, cfg.stage,
                                         cfg.dry_run_world_size, master_weights=cfg.optim.master_weights, run=run)
    return estimate, {item.label: item.bytes for item in estimate.items}


@pytest.mark.parametrize("recipe", TALKER_RECIPES)
def test_recipe_is_a_talker_run_on_8_gpu_nodes_that_fits_an_h200(recipe, capsys):
    raw = _compose(recipe)  # no dataset, tokenizer or checkpoint exists here: a dry run reads none
    validate_config(raw, world_size=raw.dry_run_world_size, cuda_available=True)
    check_stage(raw)  # the CLI's stage checks: they name the stage's code, never import it
    lines = (CONF_DIR / "recipe" / "qwen3_omni_30b_a3b" / f"{recipe}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1].startswith(f"# omni-train recipe=qwen3_omni_30b_a3b/{recipe} launcher=slurm")
    cfg = OmegaConf.to_object(raw)
    assert cfg.model.flavor == "qwen3_omni_30b_a3b_talker" and cfg.model.thinker.towers
    assert (cfg.stage.base or cfg.stage.name) in ("talker_pretrain", "talker_dpo", "speaker_finetune")
    par = cfg.parallel
    assert (par.tp, par.pp, par.cp, par.ep) == (1, 1, 1, 8) and par.distributed_optimizer
    assert cfg.dry_run_world_size % 8 == 0 and cfg.dry_run_gpu_memory_gb == H200_GB
    assert (cfg.trainer.precision, cfg.trainer.device, cfg.trainer.recompute) == ("bf16", "cuda", "full")
    assert cfg.data.name == "shards" and cfg.init_from and cfg.trainer.seq_length == SEQ_LENGTHS[recipe]
    # tp = pp = cp = 1: every rank is a data-parallel rank
    assert cfg.trainer.global_batch_size % (cfg.trainer.micro_batch_size * cfg.dry_run_world_size) == 0

    assert print_dry_run(cfg, cfg.dry_run_world_size, build=False)
    out = capsys.readouterr().out
    assert "training the Talker, the Thinker frozen beside it" in out
    assert re.search(r"Thinker \(frozen\)\s+12\.70 GB\s+6,352,054,896 parameters", out)  # LM at ep=8 + towers
    for term in ("gradients", "optimizer", "code predictor", "logits and loss"):  # the peak: the Talker's logits
        assert re.search(rf"\n    {term}\s+[\d.]+ GB", out), term
    total = float(re.search(r"fits: ([\d.]+) GB of 141 GB per GPU", out).group(1))
    assert 40 < total <= H200_GB
    assert ("reference Talker" in out) == (recipe == "talker_dpo")


def test_dpo_plan_holds_the_reference_talker(built_talker):
    """The reference Talker adds its parameters (the Talker built on the meta device, its routed experts split
    over ep = 8, 2 bytes each) and its logits (bf16, both rows of a pair), nothing else; the pair's two rows
    double the policy's activations against a one-row plan."""
    cfg = OmegaConf.to_object(_compose("talker_dpo"))
    stage = cfg.stage
    assert (stage.dpo.beta, stage.dpo.loss_type) == (0.1, "sigmoid") and 5e-7 <= cfg.optim.lr <= 1e-6
    with_reference, items = _estimate(cfg)
    without, items_without = _estimate(cfg, reference=False)
    reference_bytes = 2 * _per_rank(built_talker, ep=8)
    assert reference_bytes == 2 * 682_184_960
    talker = cfg.model.talker
    rows = 2 * cfg.trainer.micro_batch_size * cfg.trainer.seq_length
    logit_bytes = 2 * rows * (talker.codec_vocab_size + 15 * talker.code_predictor.codebook_size)
    assert items["reference Talker"] == reference_bytes and items["reference logits"] == logit_bytes
    assert with_reference.total - without.total == reference_bytes + logit_bytes
    assert with_reference.frozen - without.frozen == reference_bytes // 2
    assert with_reference.trainable == without.trainable == reference_bytes // 2  # the policy: all of it trains
    _, one_row = _estimate(cfg, reference=False, rows_per_sample=1)
    assert items_without["code predictor"] == 2 * one_row["code predictor"]


def test_speaker_finetune_plans_the_subset_it_trains(built_talker):
    """The new voice, and the trained subset: its own row (voice.row), the backbone and the code predictor but
    the codec embedding, the routed experts and the routers (from the meta build's names); no gradients or
    optimizer state for the rest. The stage's default patterns train more: the whole Talker but its codec
    embedding."""
    cfg = OmegaConf.to_object(_compose("speaker_finetune"))
    speaker, hidden = cfg.stage.speaker, cfg.model.talker.hidden_size
    assert speaker.name not in cfg.model.talker.codec.speakers and speaker.override_data_speaker

    def trained(name):
        return (name.startswith(("backbone.", "code_predictor.")) and not name.startswith("backbone.embedding.")
                and ".mlp.experts." not in name and ".mlp.router." not in name)

    subset = _per_rank(built_talker, ep=8, keep=trained) + hidden
    estimate, items = _estimate(cfg)
    assert estimate.trainable == subset and 0.25e9 < subset < 0.3e9
    assert estimate.frozen == _per_rank(built_talker, ep=8) + hidden - subset + 6_352_054_896
    assert items["gradients"] == 4 * subset
    assert items["optimizer"] == 12 * -(-subset // cfg.dry_run_world_size)  # all dense: sharded over the 8 GPUs
    default = OmegaConf.load(CONF_DIR / "stage" / "speaker_finetune.yaml")
    cfg.stage = dataclasses.replace(cfg.stage, trainable=list(default.trainable), frozen=list(default.frozen))
    whole, _ = _estimate(cfg)
    embedding = built_talker["backbone.embedding.word_embeddings.weight"]
    assert whole.trainable == _per_rank(built_talker, ep=8) - embedding + hidden
    assert whole.total > estimate.total


def test_a_code2wav_in_the_model_is_planned(capsys):
    """model.code2wav (the tiny Talker flavor holds one) is counted as transformers builds it, frozen, bf16."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeCode2Wav

    cfg = OmegaConf.to_object(compose(["recipe=tiny/talker_pretrain", "dry_run=true"]))
    with torch.device("meta"):
        code2wav = Qwen3OmniMoeCode2Wav(Qwen3OmniMoeCode2WavConfig(**cfg.model.code2wav.hf_config()))
    count = sum(p.numel() for p in code2wav.parameters())
    assert print_dry_run(cfg, 1, build=False)
    out = capsys.readouterr().out
    assert f"frozen Code2Wav (model.code2wav): {count:,} parameters" in out
    assert re.search(rf"Code2Wav \(frozen\)\s+[\d.]+ GB\s+{count:,} parameters", out)
    assert OmegaConf.to_object(_compose("talker_dpo")).model.code2wav is None  # 30B: the export takes the import's
