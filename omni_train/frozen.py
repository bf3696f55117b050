"""Models a stage runs beside the one it trains and never updates (stage.frozen_models): a reference copy
of the policy, a teacher, a judge.

Each is built by the stage's own builder (from its own sizes), laid out like the trained model over the
same process groups, loaded from its source, put in eval mode with every parameter's requires_grad off and
called under no_grad. It gets no data-parallel wrapper, so it holds no gradient buffers, and it never
reaches an optimizer. Building it leaves no trace in the RNGs or in megatron's process-wide MoE state
(parallel/process_state.py): the trained model's run is the same with or without it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from omegaconf import OmegaConf

from omni_train.checkpoint.manager import load_model_weights, resolve_init_from
from omni_train.config import FrozenModelConfig, ModelConfig, TrainConfig
from omni_train.export.from_run import run_config_path
from omni_train.parallel.process_state import preserved_rng


class FrozenModel(torch.nn.Module):
    """A model in eval mode whose forward never records autograd history (``train()`` keeps it in eval)."""

    def __init__(self, name: str, module: torch.nn.Module):
        super().__init__()
        self.name = name
        self.module = module
        for param in module.parameters():
            param.requires_grad_(False)
        module.eval()
        self.training = False

    def train(self, mode: bool = True) -> "FrozenModel":
        return self  # a stage's model.train() never reaches it

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)


def source_model_config(source: Path, fallback: ModelConfig) -> ModelConfig:
    """The sizes of the run that wrote checkpoint ``source`` (its ``<run_dir>/config.yaml``); an imported
    checkpoint, which has no run config, has the trained model's sizes."""
    path = run_config_path(source)
    if not path.exists():
        return fallback
    loaded = OmegaConf.load(path)
    if "model" not in loaded or "thinker" not in loaded.model:
        raise ValueError(f"{path}: no model.thinker section (a run written before the model config held "
                         f"sections): give the frozen model a checkpoint of this version")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), loaded.model))


def build_frozen_model(spec: FrozenModelConfig, cfg: TrainConfig, build: Callable[[TrainConfig], torch.nn.Module],
                       run_dir: Path, device: torch.device, dtype: torch.dtype,
                       load_hf: Optional[Callable] = None) -> FrozenModel:
    """``build(cfg)`` -> the stage's model for config ``cfg`` (this rank's pieces), loaded from
    ``spec.source``; ``load_hf(dir, cfg)`` imports a Hugging Face directory (default: the Thinker's import,
    in fp32 on the CPU, then moved to ``device`` and ``dtype``)."""
    with preserved_rng():
        if spec.source == "init":
            module = build(cfg)
            if cfg.init_from:
                load_model_weights(resolve_init_from(cfg.init_from, run_dir), module)
        elif spec.source.startswith("hf:"):
            module = (load_hf or import_hf_in_memory)(Path(spec.source.removeprefix("hf:")), cfg)
            module = module.to(device=device, dtype=dtype)
        else:
            checkpoint = resolve_init_from(spec.source, run_dir)
            module = build(replace(cfg, model=source_model_config(checkpoint, cfg.model)))
            load_model_weights(checkpoint, module)
    return FrozenModel(spec.name, module)


def import_hf_in_memory(hf_dir: Path, cfg: TrainConfig) -> torch.nn.Module:
    """A Hugging Face directory (Qwen3-Omni, or a Qwen3-MoE or dense Qwen3 LM for a text teacher) imported into this rank's piece
    of our model as `omni-convert import` fills it, without writing a checkpoint: the LM through the
    bridge table (per-expert weights), the towers by name when the stage's model has them."""
    from omni_train.export.verify import detect_source, import_in_memory

    if not Path(hf_dir).is_dir():
        raise FileNotFoundError(f"frozen model source hf:{hf_dir}: not a directory")
    return import_in_memory(Path(hf_dir), detect_source(hf_dir), cfg.parallel,
                            with_towers=cfg.model.thinker.towers)


def frozen_state_dicts(frozen: Dict[str, FrozenModel], specs) -> Dict[str, torch.nn.Module]:
    """The frozen models a stage asked to keep in its checkpoints (``save: true``), by name."""
    keep = {spec.name for spec in specs if spec.save}
    return {name: model.module for name, model in frozen.items() if name in keep}
