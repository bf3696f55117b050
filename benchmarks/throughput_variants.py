"""The variants that benchmarks/thinker_throughput.py compares, built in its worker processes: omni-train's
trainer (``ours*``) and transformers' Qwen3-Omni Thinker (``hf_*``) at the same sizes, on the same batches.
The variants themselves are described in thinker_throughput.py's docstring."""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

OMNI = ("ours_omni", "hf_omni_grouped_mm")  # with audio and image inputs through the towers
# The real 30B-A3B Thinker's LM width (conf/model/qwen3_omni_30b_a3b.yaml); depth from --layers.
PROXY = dict(vocab_size=152064, hidden_size=2048, num_attention_heads=32, num_query_groups=4, head_dim=128,
             num_experts=128, router_topk=8, moe_ffn_hidden_size=768, mrope_section=[24, 20, 20])
TINY = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=16,
            num_experts=8, router_topk=2, moe_ffn_hidden_size=32, mrope_section=[4, 2, 2])
LR, CLIP = 3e-4, 1.0


def model_fields(spec: dict) -> dict:
    sizes = TINY if spec["tiny"] else PROXY
    return dict(sizes, num_layers=spec["layers"],
                aux_loss_coeff=0.0, max_position_embeddings=max(4096, spec["seq_length"]))


def model_config(spec: dict):
    from omni_train.config.schema import ThinkerConfig

    return ThinkerConfig(**model_fields(spec))


def lm_overrides(spec: dict) -> list:
    return [f"model.thinker.{k}={v}" for k, v in model_fields(spec).items()]


def omni_flavor(spec: dict) -> str:
    return "tiny_omni" if spec["tiny"] else "qwen3_omni_30b_a3b"


def omni_model_config(spec: dict):
    """model_config(spec)'s LM with the towers of the omni flavor (sizes from its conf/model yaml)."""
    from omegaconf import OmegaConf

    from omni_train.config import compose

    composed = compose([f"model={omni_flavor(spec)}", "model.thinker.towers=true", *lm_overrides(spec)])
    return OmegaConf.to_object(composed).model.thinker


def make_batches(spec: dict, vocab_size: int, count: int, device):
    """``count`` micro-batches of seeded random tokens, in the trainer's batch format, on ``device``."""
    import torch

    from omni_train.data.batch import TextBatch

    g = torch.Generator().manual_seed(spec["seed"])
    b, s = spec["micro_batch"], spec["seq_length"]
    tokens = torch.randint(0, vocab_size, (count, b, s + 1), generator=g)
    positions = torch.arange(s).expand(3, b, s).contiguous().to(device)
    return [TextBatch(
        input_ids=t[:, :-1].contiguous().to(device),
        labels=t[:, 1:].contiguous().to(device),
        loss_mask=torch.ones(b, s, device=device),
        position_ids=positions,
        keys=[f"bench:{i}:{r}" for r in range(b)],
    ) for i, t in enumerate(tokens)]


class FixedBatches:
    """Stands in for the trainer's data source: ``per_step`` micro-batches per optimizer step."""

    def __init__(self, batches, per_step: int = 1):
        self.batches, self.per_step, self.step = batches, per_step, 0

    def next_microbatches(self):
        start = self.step * self.per_step
        self.step += 1
        return [self.batches[(start + i) % len(self.batches)] for i in range(self.per_step)]

    def stats(self):
        return {}


def ours_overrides(variant: str, spec: dict, on_gpu: bool, tokenizer=None) -> list:
    """The Hydra overrides of an ``ours*`` variant: recipe text_pretrain at the benchmark's sizes; the
    omni variant swaps in stage multimodal_pretrain and the towers' flavor."""
    omni = variant in OMNI
    flavor = omni_flavor(spec) if omni else ("tiny" if spec["tiny"] else "qwen3_omni_30b_a3b")
    overrides = ["recipe=tiny/text_pretrain_gpu" if on_gpu else "recipe=tiny/text_pretrain",
                 f"model={flavor}", "logger=none",
                 f"trainer.seq_length={spec['seq_length']}", f"trainer.micro_batch_size={spec['micro_batch']}",
                 f"trainer.global_batch_size={spec['micro_batch'] * spec.get('micro_batches', 1)}",
                 "trainer.max_steps=1000",
                 f"trainer.device={'cuda' if on_gpu else 'cpu'}",
                 f"trainer.precision={'bf16' if on_gpu else 'fp32'}",
                 f"trainer.seed={spec['seed']}", f"optim.lr={LR}", f"optim.clip_grad={CLIP}",
                 # the transformers side steps at a constant LR from the first step: so do we
                 "optim.warmup_steps=0", "optim.lr_decay=constant",
                 "checkpoint.save_every=100000", "checkpoint.save_at_end=false",
                 f"run_dir={tempfile.mkdtemp(prefix='thinker_throughput_')}", *lm_overrides(spec)]
    if variant == "ours_bf16" or (omni and not spec.get("master_weights", True)):
        overrides += ["optim.master_weights=false", "parallel.distributed_optimizer=false"]
    if variant == "ours_sequential":  # megatron's SequentialMLP experts and alltoall dispatcher, for reference
        overrides += ["model.thinker.experts_impl=sequential"]
    if omni:  # the stage reads its placeholder ids from the tokenizer; its data source is replaced below
        overrides += ["stage=multimodal_pretrain", "model.thinker.towers=true", "data=shards",
                      f"data.tokenizer={tokenizer}", "data.datasets=[{path: benchmark_batches}]"]
    return overrides + list(spec.get("ours_overrides", []))


def _tower_parameters(model) -> int:
    # tower modules are audio_tower.* / visual.* (thinker.* or model.* prefixes in some transformers versions)
    return sum(p.numel() for n, p in model.named_parameters() if "audio_tower." in n or "visual." in n)


def build_ours(variant: str, spec: dict, device):
    """The trainer as `omni-train` builds it (recipe text_pretrain, or stage multimodal_pretrain for
    ours_omni), at the benchmark's sizes, its data source replaced by the benchmark's batches."""
    from omegaconf import OmegaConf

    from omni_train.config import compose, validate_config
    from omni_train.loops.supervised import SupervisedLoop
    from omni_train.session import Session
    from omni_train.parallel.setup import init_parallel
    from omni_train.stages import load_stage
    from omni_media_batches import omni_batches, placeholder_ids  # benchmarks/, this script's folder
    from step_profile import label_parts

    on_gpu = device.type == "cuda"
    omni = variant in OMNI
    tokenizer, ids = placeholder_ids() if omni else (None, None)
    composed = compose(ours_overrides(variant, spec, on_gpu, tokenizer))
    checked = composed.copy()
    checked.dry_run = True  # the data source is replaced by the benchmark's batches: no dataset to find
    validate_config(checked, world_size=1, cuda_available=on_gpu)
    cfg = OmegaConf.to_object(composed)
    per_step = spec.get("micro_batches", 1)
    count = (spec["warmup"] + spec["steps"] + 1) * per_step
    batches = (omni_batches(spec, cfg.model.thinker, ids, count, device) if omni
               else make_batches(spec, cfg.model.thinker.vocab_size, count, device))
    # This process runs one variant: the stage's data source becomes the benchmark's batches.
    load_stage(cfg.stage).build_data = lambda cfg, env: FixedBatches(batches, per_step)
    env = init_parallel(cfg.parallel, device, cfg.trainer.seed)
    trainer = SupervisedLoop(Session(cfg, env, resolved={}))
    label_parts(trainer)
    info = dict(parameters=sum(p.numel() for p in trainer.model.parameters()),
                tower_parameters=_tower_parameters(trainer.model),
                optimizer=type(trainer.optimizer).__name__, token_dispatcher=cfg.parallel.token_dispatcher,
                distributed_optimizer=on_gpu and cfg.parallel.distributed_optimizer,
                master_weights=getattr(cfg.optim, "master_weights", True))
    step = lambda: trainer.train_step()["loss"]  # noqa: E731
    step.trainer = trainer
    return step, info


def hf_thinker_config(m, impl: str, placeholder_ids=None):
    """transformers' thinker config for ThinkerConfig ``m``. Text-only use (``placeholder_ids`` None): towers
    shrunk (they get no input, hence no gradient and no optimizer state). Omni use: the towers of
    ``m.audio_tower`` / ``m.vision_tower`` and the tokenizer's placeholder ids, as the stage builds them."""
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig

    from omni_train.models.thinker.bridge import hf_text_config
    from omni_train.models.thinker.hf_config import hf_thinker_config as stage_towers

    # the LM of our sizes (the bridge's mapping); no cache, no router logits, no aux loss in training
    text = dict(hf_text_config(m), use_cache=False, output_router_logits=False, router_aux_loss_coef=0.0)
    if placeholder_ids is not None:
        return Qwen3OmniMoeThinkerConfig(text_config=text, **stage_towers(m, placeholder_ids),
                                         tie_word_embeddings=False, experts_implementation=impl)
    top = m.vocab_size - 1  # placeholder ids: never fed (text-only), must be < vocab
    return Qwen3OmniMoeThinkerConfig(
        text_config=text,
        audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          output_dim=m.hidden_size, n_window=4, downsample_hidden_size=8),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=m.hidden_size, deepstack_visual_indexes=[0]),
        audio_token_id=top, image_token_id=top - 1, video_token_id=top - 2, vision_start_token_id=top - 3,
        audio_start_token_id=top - 4, tie_word_embeddings=False, experts_implementation=impl,
    )


def build_hf(variant: str, spec: dict, device):
    """transformers' Thinker: ``hf_<impl>`` text-only with shrunk towers, ``hf_omni_<impl>`` with the
    omni flavor's towers on the omni batches."""
    import torch
    import torch.nn.functional as F
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from omni_media_batches import hf_inputs, omni_batches, placeholder_ids

    omni = variant in OMNI
    impl = variant.removeprefix("hf_omni_" if omni else "hf_")
    on_gpu = device.type == "cuda"
    per_step = spec.get("micro_batches", 1)
    count = (spec["warmup"] + spec["steps"] + 1) * per_step
    if omni:
        m = omni_model_config(spec)
        _, ids = placeholder_ids()
        config, batches = hf_thinker_config(m, impl, ids), omni_batches(spec, m, ids, count, device)
    else:
        m = model_config(spec)
        config, batches = hf_thinker_config(m, impl), make_batches(spec, m.vocab_size, count, device)
    torch.manual_seed(spec["seed"])
    with torch.device(device):
        model = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16 if on_gpu else torch.float32,
            attn_implementation="sdpa", experts_implementation=impl)
    with torch.no_grad():  # explicit init: no parameter left as torch.empty
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights 1, biases (towers) 0
                p.fill_(1.0 if ("norm" in name or ".ln_" in name) and name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, m.init_std)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                                  fused=on_gpu, foreach=None if on_gpu else True)
    batches = itertools.cycle(batches)  # the profiled and sync-checked steps come after the timed ones

    def micro_step(batch) -> torch.Tensor:
        if omni:  # media copied to the device each step, as the loop does
            inputs = hf_inputs(batch, device)
            labels = inputs.pop("labels")
        else:
            inputs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
            labels = batch["labels"]
        logits = model(**inputs, use_cache=False).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
        (loss / per_step).backward()  # gradient accumulation: the mean over the step's micro-batches
        return loss.detach()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        losses = [micro_step(next(batches)) for _ in range(per_step)]
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        optimizer.step()
        return torch.stack(losses).mean()  # read after the timed steps (transformers' Trainer syncs to log)

    towers = _tower_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    # text-only: the LM's parameters (the shrunk towers are not part of the compared model)
    info = dict(parameters=total if omni else total - towers, tower_parameters=towers if omni else 0,
                experts_implementation=model.config.text_config._experts_implementation,
                attn_implementation=model.config.text_config._attn_implementation, optimizer="AdamW(fused)")
    return step, info
