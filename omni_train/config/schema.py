"""Typed configuration schemas, one dataclass per config group.

Every field is a primitive (str, int, float, bool, list, Optional). Torch objects are built from these in
``build_*`` functions; no component ever receives the whole tree, only its own sub-config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING

from omni_train.config.rewards import RewardsConfig
from omni_train.config.rollout import GSPOConfig, RolloutConfig
from omni_train.config.talker import AudioSamplesConfig, Code2WavConfig, DPOConfig, SpeakerConfig, TalkerConfig


@dataclass
class AudioTowerConfig:
    """Sizes of the audio encoder (transformers' Qwen3OmniMoeAudioEncoderConfig); its output width is
    the LM's hidden_size. Defaults: transformers' defaults, the released Qwen3-Omni-30B-A3B audio tower."""

    num_layers: int = 32
    d_model: int = 1280
    num_heads: int = 20
    ffn_dim: int = 5120
    num_mel_bins: int = 128  # must match the data's log-mel features (128)
    n_window: int = 50  # must be 50: the placeholder count formula assumes 13 tokens per 100 frames
    n_window_infer: int = 800
    downsample_hidden_size: int = 480
    max_source_positions: int = 1500


@dataclass
class VisionTowerConfig:
    """Sizes of the vision encoder (transformers' Qwen3OmniMoeVisionEncoderConfig); its output width is
    the LM's hidden_size. Defaults: transformers' defaults, the released Qwen3-Omni-30B-A3B vision tower.
    patch_size / spatial_merge_size / temporal_patch_size must match the data's patching (16 / 2 / 2)."""

    depth: int = 27
    hidden_size: int = 1152
    num_heads: int = 16
    intermediate_size: int = 4304
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    num_position_embeddings: int = 2304
    # after these vision blocks, features are added to the LM's hidden states after decoder layers 0..k-1
    deepstack_visual_indexes: List[int] = field(default_factory=lambda: [8, 16, 24])


@dataclass
class ThinkerConfig:
    """Sizes of the Thinker: its MoE language model (Qwen3-MoE architecture) and, with ``towers``, its
    audio and vision encoders."""

    vocab_size: int = MISSING
    hidden_size: int = MISSING
    num_layers: int = MISSING
    num_attention_heads: int = MISSING
    num_query_groups: int = MISSING  # GQA: key/value heads
    head_dim: int = MISSING  # independent of hidden_size / heads, as in Qwen3
    num_experts: int = MISSING
    router_topk: int = MISSING
    moe_ffn_hidden_size: int = MISSING  # per routed expert
    # num_experts: 0 is a dense LM (Qwen3ForCausalLM, e.g. a Qwen3-32B teacher): every layer a SwiGLU MLP of
    # this width; router_topk and moe_ffn_hidden_size are then 0 and the MoE fields below are not read.
    ffn_hidden_size: int = 0
    # the output layer reads the input embedding's weight (small Qwen3 models); no separate lm_head
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    # TM-RoPE: rotary angles given to the temporal / height / width position ids, interleaved across the
    # rotary dimension. Must sum to head_dim // 2.
    mrope_section: List[int] = field(default_factory=lambda: [24, 20, 20])
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 65536
    init_std: float = 0.02
    # Load balancing: "aux_loss" (switch-style auxiliary loss, coefficient below) or "expert_bias"
    # (aux-loss-free: a per-expert bias nudged towards balance after every step).
    load_balancing: str = "aux_loss"
    aux_loss_coeff: float = 1e-3
    expert_bias_update_rate: float = 1e-3
    # Routed experts: "grouped" (two stacked weights per layer, one torch._grouped_mm per projection for all
    # local experts) or "sequential" (megatron's SequentialMLP: a weight pair and a matmul pair per expert).
    # Both read and write the same per-expert checkpoints.
    experts_impl: str = "grouped"
    # Audio and vision towers in front of the LM (stage multimodal_pretrain). Replicated on every rank:
    # tp = pp = cp = 1 only.
    towers: bool = False
    # On CUDA (with Triton): each tower layer through torch.compile (dynamic shapes), fused elementwise
    # kernels and far less host work per layer than transformers' eager modules (the towers' step is
    # bound by the host's kernel launches otherwise). Not with trainer.recompute=full.
    compile_towers: bool = True
    audio_tower: AudioTowerConfig = field(default_factory=AudioTowerConfig)
    vision_tower: VisionTowerConfig = field(default_factory=VisionTowerConfig)


@dataclass
class ModelConfig:
    """The networks of a flavor (conf/model/<flavor>.yaml): the Thinker always, the Talker where a stage
    trains or conditions on it. Each section is handed to its own provider (omni_train/models/<name>/)."""

    flavor: str = MISSING
    thinker: ThinkerConfig = MISSING
    # The Talker's sizes (omni_train/config/talker.py); null for the Thinker's stages. A flavor that sets it
    # (qwen3_omni_30b_a3b_talker, tiny_omni_talker) describes the Talker trained with the Thinker frozen.
    talker: Optional[TalkerConfig] = None
    # A frozen Code2Wav built from a seed for Talker stages trained without an import (config/talker.py).
    code2wav: Optional[Code2WavConfig] = None


@dataclass
class ParallelConfig:
    """Parallel layout. Data parallel size is derived: world_size / (tp * pp * cp)."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    token_dispatcher: str = "alltoall"  # "alltoall" | "allgather"
    distributed_optimizer: bool = True  # used on GPU; the CPU path runs the plain megatron optimizer
    backend: str = "auto"  # "auto" (nccl on GPU, gloo on CPU) | "nccl" | "gloo"
    # A collective that waits longer than this fails with an error naming the rank and step (a rank that
    # died or hangs). Applies to every process group, megatron's included.
    collective_timeout_s: float = 1800.0


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 10
    lr_decay: str = "cosine"  # "cosine" | "linear" | "constant"
    # bf16 training keeps fp32 main params, fp32 grads and fp32 AdamW moments (18 bytes per parameter).
    # false: AdamW updates the bf16 parameters directly from bf16 grads with bf16 moments (8 bytes per
    # parameter), as transformers + torch.optim.AdamW do; small updates can be lost to bf16 rounding.
    master_weights: bool = True
    # "compiled": one fused elementwise pass per parameter (parallel/adamw.py; inductor on CUDA, eager
    # elsewhere); "torch_fused": torch's multi-tensor fused AdamW kernel.
    kernel: str = "compiled"


@dataclass
class TrainerConfig:
    max_steps: int = 100
    # Save a checkpoint and exit cleanly after this step, as a preempted job would. The LR schedule still
    # follows max_steps.
    stop_at_step: Optional[int] = None
    log_every: int = 1
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 2  # sequences per forward pass on one rank
    seq_length: int = 128
    seed: int = 1234
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp32"
    # A step whose loss or gradients are not finite: "stop" (raise with a report naming the step, its sample
    # keys and the first parameter with a non-finite gradient) or "skip" (no update, counted in the
    # metrics as nonfinite_skipped; stops once more than max_nonfinite_skips steps were skipped).
    nonfinite: str = "stop"
    max_nonfinite_skips: int = 10
    # Activation recomputation: "none" | "full" (every LM decoder layer's activations recomputed in the
    # backward pass, megatron-core's full/uniform recompute; the towers use gradient checkpointing).
    recompute: str = "none"


@dataclass
class DatasetConfig:
    path: str = MISSING  # a dataset directory written by `omni-data build` (index.json + shards)
    weight: float = 1.0


@dataclass
class DataConfig:
    """What every data source has; each source extends it with its own schema (conf/data/<name>.yaml)."""

    name: str = MISSING  # "synthetic_text" | "shards"
    seed: int = 0


@dataclass
class SyntheticTextDataConfig(DataConfig):
    """A seeded stream of token sequences with learnable structure (omni_train/data/synthetic_text.py)."""

    name: str = "synthetic_text"
    num_patterns: int = 64


@dataclass
class ChatConfig:
    """How a conversation becomes tokens and targets (omni_train/data/chat.py)."""

    # An assistant turn's reasoning (`reasoning_content`, or a <think>...</think> block at the start of its
    # text): "raw": the text as written (pretraining); "keep": every assistant turn as
    # "<think>\n{reasoning}\n</think>\n\n{answer}", an empty block where it has none (trl's Qwen3 training
    # template); "empty": the block always empty (non-thinking responses); "strip": no block at all;
    # "last": kept in the turns after the last user message, stripped before it (Qwen3's own template at
    # inference, so multi-turn history looks as it will when the model is served).
    think: str = "raw"
    # Added as the first message of a conversation that has no system message (null: none added).
    system_prompt: Optional[str] = None
    # The "\n" after an assistant turn's <|im_end|> is a target too (trl's Qwen3 training template marks it).
    target_newline_after_end: bool = False


@dataclass
class ResponsesConfig:
    """Which assistant turns a conversation trains on (omni_train/data/responses.py)."""

    source: str = "messages"  # "messages": the sample's own; "teacher": a stored teacher response
    teachers: List[str] = field(default_factory=list)  # teacher `model` names to take (empty: any)
    modes: List[str] = field(default_factory=list)  # teacher `mode`s to take, e.g. [no_think] (empty: any)
    pick: str = "first"  # among matching entries: "first" | "random" (seeded by data.seed and the sample key)
    drop_truncated: bool = True  # skip (and count) a teacher response that stopped at its length limit
    # K > 0: load the first K of the teacher's stored top log-probabilities (distill_offpolicy's logit term)
    top_logprobs: int = 0
    # A conversation with no assistant turn to train on is skipped and counted (fine-tuning) instead of
    # being packed without targets.
    require_targets: bool = False


@dataclass
class ShardsDataConfig(DataConfig):
    """Weighted WebDataset datasets, chat-encoded and packed to trainer.seq_length (omni_train/data/shards.py)."""

    name: str = "shards"
    datasets: List[DatasetConfig] = field(default_factory=list)
    weight_by: str = "samples"  # "samples" | "tokens"
    tokenizer: Optional[str] = None  # local directory (AutoTokenizer.from_pretrained)
    num_workers: int = 0
    shuffle_buffer: int = 1000
    overlong: str = "split"  # a document longer than seq_length: "split" or "drop" (both counted)
    video_fps: float = 2.0
    max_consecutive_failures: int = 100
    max_skip_rate: float = 0.05
    min_samples_for_skip_rate: int = 1000
    chat: ChatConfig = field(default_factory=ChatConfig)
    responses: ResponsesConfig = field(default_factory=ResponsesConfig)


# conf/data/<name>.yaml <-> its schema (registered in Hydra's ConfigStore as data/<name>_schema)
DATA_SCHEMAS = {"synthetic_text": SyntheticTextDataConfig, "shards": ShardsDataConfig}


@dataclass
class LoggerConfig:
    name: str = "none"  # "none" | "wandb"
    project: str = "omni-train"
    entity: Optional[str] = None
    # "offline" | "online" | "disabled"; tiny recipes read WANDB_MODE and fall back to offline.
    mode: str = "offline"
    run_name: Optional[str] = None
    # W&B's run group: a pipeline sets one for all its stages (summary.pipeline_group) so they show as one
    group: Optional[str] = None
    job_type: Optional[str] = None  # None: the stage's name


@dataclass
class CheckpointConfig:
    save_every: int = 50
    keep_last: int = 2
    save_at_end: bool = True


@dataclass
class PhaseConfig:
    """A span of a stage's steps with its own trainable set (e.g. S1: the adapter first, then the encoder
    with it). The optimizer is rebuilt at each phase start, so frozen parameters hold no optimizer state."""

    name: str = MISSING
    steps: int = MISSING
    trainable: List[str] = field(default_factory=lambda: [".*"])
    frozen: List[str] = field(default_factory=list)


@dataclass
class FrozenModelConfig:
    """A model that a stage runs beside the one it trains and never updates: a reference copy of the
    policy, a teacher, a judge. It lives in eval mode under no_grad, holds no gradient buffers and no
    optimizer state, and is laid out like the trained model (the same tp / pp / ep over the same process
    groups)."""

    name: str = MISSING  # how the stage's forward and the metrics name it ("reference", "teacher")
    # Where its weights come from: "init" (the trained model's starting weights: init_from, else the same
    # seeded initialisation), "stage:<name>" or a checkpoint path (its sizes from that run's config.yaml),
    # or "hf:<dir>" (a Hugging Face directory, imported in memory through the bridge table).
    source: str = "init"
    save: bool = False  # also write it into this stage's checkpoints (restored from them on resume)
    # Its sizes for planning (the dry run's memory estimate), as a conf/model flavor name (e.g. qwen3_32b):
    # for an "hf:<dir>" that is not on this machine. Where <dir>/config.json (or the source run's
    # config.yaml) is readable, that wins; null: those, else the trained model's sizes.
    model: Optional[str] = None


@dataclass
class StageLossConfig:
    """Loss terms and weights of the stages that have more than one (read by the stage's ``options``)."""

    # distill_offpolicy: weight of the top-k logit term (KL to the teacher's stored top-k + tail) next to
    # the cross-entropy on the teacher's response; both are means over the response tokens
    top_k_weight: float = 1.0
    # distill_onpolicy: the per-token divergence to the teacher over the full vocabulary (losses/onpolicy.py):
    # "reverse_kl" KL(student || teacher) (default), "forward_kl" KL(teacher || student), "jsd" generalised
    # JSD with `beta` (trl GKD's: beta 0 forward, 1 reverse), or "sampled_token": the sampled token's
    # log-ratio log p_teacher - log p_student as a per-token advantage (the cheaper form, no full vocabulary)
    divergence: str = "reverse_kl"
    beta: float = 0.5  # jsd only
    temperature: float = 1.0  # both models' logits are divided by it
    chunk_tokens: int = 1024  # the full-vocabulary divergence runs over at most this many positions at once
    # distill_onpolicy: distil only text prompts when the teacher takes no media (a text LLM); false: such a
    # teacher with multimodal prompts is a config error
    text_prompts_only: bool = False


@dataclass
class StageConfig:
    name: str = MISSING
    # The registered stage whose code (model, data, forward) this stage runs (omni_train/stages/__init__.py);
    # null: the stage registered under `name`. Stages that differ only in configuration share one.
    base: Optional[str] = None
    loop: str = "supervised"  # the loop that drives it (omni_train/loops/): "supervised" | "rollout"
    frozen_models: List[FrozenModelConfig] = field(default_factory=list)
    # Regular expressions over parameter names; a parameter trains when it matches `trainable` and not
    # `frozen`.
    trainable: List[str] = field(default_factory=lambda: [".*"])
    frozen: List[str] = field(default_factory=list)
    # Consecutive phases, each with its own trainable/frozen patterns (replacing the two above); their
    # steps must add up to trainer.max_steps. Empty: one phase, the whole run.
    phases: List[PhaseConfig] = field(default_factory=list)
    loss: StageLossConfig = field(default_factory=StageLossConfig)
    # stages driven by the rollout loop (stage.loop=rollout): how responses are sampled (config/rollout.py)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # gspo: the policy update (config/rollout.py) and how samples are scored (config/rewards.py)
    gspo: GSPOConfig = field(default_factory=GSPOConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    # talker_dpo: the preference loss; speaker_finetune: the voice (config/talker.py)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    speaker: Optional[SpeakerConfig] = None
    # the Talker's stages: spoken samples written and logged when the stage finishes
    audio_samples: AudioSamplesConfig = field(default_factory=AudioSamplesConfig)


@dataclass
class LauncherConfig:
    """How a run is started: conf/launcher/<name>.yaml <-> omni_train/launch/<name>.py."""

    name: str = "local"  # "local" (this process) | "torchrun" (spawns torchrun) | "slurm" (sbatch)
    # Processes per node. None: one per GPU (cluster.gpus_per_node under SLURM, the visible GPUs for
    # torchrun), or 1 where there are none.
    nproc_per_node: Optional[int] = None
    # torchrun on several machines without SLURM: run the same command on each; rendezvous at node 0.
    nnodes: int = 1
    rdzv_endpoint: Optional[str] = None  # "host:port" of node 0; needed when nnodes > 1
    # Print the command (torchrun) or the batch script (slurm) and start nothing.
    dry_run: bool = False
    # slurm: USR1 arrives this long before the time limit; training saves and the job requeues itself.
    signal_seconds: int = 300
    # slurm: the c10d rendezvous port on the job's first node. None: 20000 + job id % 10000, so that jobs
    # sharing a node do not collide.
    rdzv_port: Optional[int] = None
    job_name: Optional[str] = None  # slurm: default omni-train-<stage name>-<hash of the run directory>


@dataclass
class ClusterConfig:
    """A SLURM cluster (conf/cluster/<name>.yaml): where and how `launcher=slurm` places a run."""

    name: str = MISSING
    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU cluster (launcher.nproc_per_node processes per node)
    cpus_per_node: Optional[int] = None  # --cpus-per-task of the one task (torchrun) on each node
    mem: Optional[str] = None  # --mem per node, e.g. "0" (all of it)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: str = "04:00:00"
    sbatch_args: List[str] = field(default_factory=list)  # more #SBATCH options, e.g. "--exclusive"
    setup: List[str] = field(default_factory=list)  # shell lines before training: modules, venv, exports
    python: Optional[str] = None  # the interpreter on the nodes; None: the one that submits
    container_image: Optional[str] = None  # run in this image (pyxis: srun --container-image)
    container_mounts: List[str] = field(default_factory=list)


@dataclass
class PipelineStageConfig:
    recipe: str = MISSING  # a recipe under recipes/, e.g. tiny/audio_align
    overrides: List[str] = field(default_factory=list)  # applied after the recipe, before the user's


@dataclass
class PipelineConfig:
    """A chain of stage recipes run one after another in `run_dir/<stage name>`, each starting from the
    previous stage's final checkpoint, then an export to `run_dir/export` (omni_train/pipeline.py)."""

    stages: List[PipelineStageConfig] = field(default_factory=list)  # empty: a single-stage run
    # `omni-data synth-suite` into this directory when it has no tokenizer yet (tiny recipes); null: none
    synth_root: Optional[str] = None
    synth_samples: int = 16  # samples per data kind
    export: bool = True
    # Printed at the end: the exported model's greedy answer to this prompt (null: no generation)
    prompt: Optional[str] = "Describe what you see."
    max_new_tokens: int = 16
    # An export with a Talker also speaks the answer (run_dir/answer.wav): in this voice (a name of its
    # talker_config.speaker_id; null: the first), at most this many 12.5 Hz codec frames
    speaker: Optional[str] = None
    max_audio_frames: int = 50


@dataclass
class TrainConfig:
    model: ModelConfig = MISSING
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)  # the chosen source's schema (DATA_SCHEMAS)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    stage: StageConfig = MISSING
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    cluster: Optional[ClusterConfig] = None  # launcher=slurm: cluster=<name> from conf/cluster/
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    # The stage's own directory. Its parent is the run root, in which `init_from=stage:<name>` resolves.
    run_dir: str = MISSING
    # Start from another checkpoint: "stage:<name>" (that stage's final checkpoint in the run root) or a path.
    init_from: Optional[str] = None
    # Build on the meta device, print parameter counts, shard shapes and the per-rank memory estimate,
    # allocate nothing, exit (status 3 when the estimate exceeds dry_run_gpu_memory_gb).
    dry_run: bool = False
    # The number of GPUs the dry run describes (it sets data parallel and optimizer sharding); null: the
    # smallest world the layout takes, tp * pp * lcm(cp, ep). Recipes set the size they are written for.
    dry_run_world_size: Optional[int] = None
    # Memory per GPU, in GB (1e9 bytes), the dry run's estimate must fit. An "80GB" H100 holds 85.5e9
    # bytes, so 80 leaves ~5 GB for what the estimate does not count (CUDA context, NCCL, fragmentation).
    dry_run_gpu_memory_gb: float = 80.0
