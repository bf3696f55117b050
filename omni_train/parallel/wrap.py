"""Wrap a megatron model for data parallelism and build its optimizer and LR schedule."""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from omni_train.config import OptimConfig, ParallelConfig, TrainerConfig


def wrap_data_parallel(model, parallel: ParallelConfig, on_gpu: bool) -> DistributedDataParallel:
    """megatron-core DDP: contiguous fp32 grad buffers, grads reduced once per optimizer step.

    The distributed optimizer (grads reduce-scattered, optimizer state sharded over data parallel
    ranks) is used on GPU; megatron's implementation of it needs CUDA tensors.
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=on_gpu and parallel.distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(cfg: OptimConfig, model: DistributedDataParallel, parallel: ParallelConfig,
                    bf16: bool, on_gpu: bool):
    """AdamW through megatron-core (decoupled weight decay), with gradient clipping."""
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.beta1,
        adam_beta2=cfg.beta2,
        adam_eps=cfg.eps,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=on_gpu and parallel.distributed_optimizer,
    )
    return get_megatron_optimizer(opt_config, [model])


def build_scheduler(cfg: OptimConfig, trainer: TrainerConfig, optimizer) -> OptimizerParamScheduler:
    """Linear warmup to optim.lr, then decay to optim.min_lr at trainer.max_steps (never stop_at_step)."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=trainer.max_steps,
        lr_decay_style=cfg.lr_decay,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=trainer.max_steps,
        wd_incr_style="constant",
    )
