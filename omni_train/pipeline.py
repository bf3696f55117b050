"""A multi-stage run: `omni-train recipe=tiny/pretrain_pipeline`.

The pipeline recipe lists stage recipes (``pipeline.stages``). Each stage runs as its own `omni-train`
process (under the user's launcher) in ``<run_dir>/<stage name>``, starting from the previous stage's
final checkpoint (``init_from=stage:<previous>``); then the last stage is exported to
``<run_dir>/export`` in the Hugging Face layout and the exported model answers ``pipeline.prompt``.

Rerunning the same command skips every stage whose final checkpoint exists, resumes the first one that
is not finished (from its latest checkpoint) and runs the rest. Every stage's config is composed and
validated before the first one starts, so a bad override fails in seconds, not after hours of S1.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from omegaconf import DictConfig

from omni_train.checkpoint.manager import checkpoint_step, latest_checkpoint
from omni_train.config import ConfigError, compose, validate_config
from omni_train.launch import launched_world
from omni_train.loops import check_stage

# Keys the pipeline sets for each stage itself; the user's values for them are the pipeline's own.
PIPELINE_KEYS = ("recipe", "run_dir", "init_from", "pipeline")


@dataclass
class PlannedStage:
    name: str
    overrides: List[str]
    run_dir: Path
    max_steps: int

    def finished(self) -> bool:
        latest = latest_checkpoint(self.run_dir / "checkpoints")
        return latest is not None and checkpoint_step(latest) >= self.max_steps


def _say(text: str) -> None:
    print(f"[pipeline] {text}", flush=True)


def _forwarded(argv: List[str]) -> List[str]:
    """The user's overrides that apply to every stage (launcher, parallel layout, logger, ...)."""
    keep = []
    for arg in argv:
        key = arg.lstrip("+~").split("=", 1)[0]
        if not arg.startswith("-") and not key.startswith("hydra.") and key.split(".")[0] not in PIPELINE_KEYS:
            keep.append(arg)
    return keep


def make_data(cfg: DictConfig) -> None:
    """`omni-data synth-suite` into pipeline.synth_root, once (its tokenizer marks it done)."""
    root = cfg.pipeline.synth_root
    if root is None or (Path(root) / "tokenizer").is_dir():
        return
    # the offline tool runs as its own process: the library never imports data_pipelines
    start = time.perf_counter()
    command = [sys.executable, "-m", "data_pipelines.cli", "synth-suite", str(root),
               "--samples", str(cfg.pipeline.synth_samples)]
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"omni-train: pipeline: `{' '.join(command[1:])}` failed")
    _say(f"made synthetic data in {root} in {time.perf_counter() - start:.1f}s")


def plan(cfg: DictConfig, argv: List[str]) -> List[PlannedStage]:
    """Compose and validate every stage (ConfigError names the stage and key)."""
    root, shared, stages = Path(cfg.run_dir), _forwarded(argv), []
    for i, entry in enumerate(cfg.pipeline.stages):
        try:
            stage_cfg = compose([f"recipe={entry.recipe}", *entry.overrides, *shared])
            name = stage_cfg.stage.name
            # where it runs and starts from: the pipeline's, whatever the stage recipe says
            stage_cfg.run_dir = str(root / name)
            stage_cfg.init_from = f"stage:{stages[-1].name}" if stages else cfg.init_from
            if stage_cfg.launcher.name == "slurm":
                raise ConfigError("launcher", "a pipeline runs its stages one after another on this machine; "
                                  "under SLURM submit each stage recipe, or run the pipeline inside an allocation "
                                  "with launcher=torchrun")
            validate_config(stage_cfg, world_size=launched_world(stage_cfg) or 1,
                            cuda_available=torch.cuda.is_available())
            check_stage(stage_cfg)
        except ConfigError as exc:
            raise ConfigError(f"pipeline.stages[{i}] ({entry.recipe}): {exc.key}", exc.problem) from exc
        overrides = [f"recipe={entry.recipe}", *entry.overrides, *shared, f"run_dir={stage_cfg.run_dir}",
                     f"init_from={stage_cfg.init_from or 'null'}"]
        stages.append(PlannedStage(name, overrides, root / name, int(stage_cfg.trainer.max_steps)))
    return stages


def run_stage(stage: PlannedStage) -> None:
    cmd = [sys.executable, "-m", "omni_train.train", *stage.overrides]
    _say(f"stage {stage.name}: {' '.join(cmd[1:])}")
    start = time.perf_counter()
    code = subprocess.call(cmd)
    if code != 0:
        raise RuntimeError(f"stage {stage.name} failed with exit code {code}; rerun the same command to resume "
                           f"it from {stage.run_dir / 'checkpoints'}")
    if not stage.finished():  # trainer.stop_at_step, or a preemption that exited cleanly
        raise RuntimeError(f"stage {stage.name} stopped before step {stage.max_steps}; rerun the same command "
                           f"to resume it from {stage.run_dir / 'checkpoints'}")
    _say(f"stage {stage.name} finished in {time.perf_counter() - start:.1f}s")


def export_and_generate(cfg: DictConfig, last: PlannedStage) -> Optional[str]:
    from omni_train.export.generate import generate_text

    out = Path(cfg.run_dir) / "export"
    source = latest_checkpoint(last.run_dir / "checkpoints")
    if (out / "config.json").exists() and (out / "exported_from").exists() and \
            (out / "exported_from").read_text().strip() == str(source):
        _say(f"export {out} is up to date (from {source})")
    else:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "omni_train.export.convert", "export", str(source), str(out)]
        if subprocess.call(cmd) != 0:
            raise RuntimeError(f"export of {source} failed; rerun the same command to retry it")
        (out / "exported_from").write_text(f"{source}\n")
        _say(f"exported {source} -> {out} in {time.perf_counter() - start:.1f}s")
    if cfg.pipeline.prompt is None:
        return None
    text = generate_text(out, cfg.pipeline.prompt, max_new_tokens=cfg.pipeline.max_new_tokens)
    _say(f"generation from {out} (greedy, {cfg.pipeline.max_new_tokens} new tokens)\n"
         f"  user:      {cfg.pipeline.prompt}\n  assistant: {text}")
    return text


def run_pipeline(cfg: DictConfig, argv: List[str]) -> int:
    start = time.perf_counter()
    make_data(cfg)
    try:
        stages = plan(cfg, argv)
    except ConfigError as exc:
        print(f"omni-train: config error: {exc}", file=sys.stderr, flush=True)
        return 2
    for stage in stages:
        if stage.finished():
            _say(f"stage {stage.name}: finished earlier ({stage.run_dir}), skipped")
            continue
        try:
            run_stage(stage)
        except RuntimeError as exc:
            print(f"omni-train: {exc}", file=sys.stderr, flush=True)
            return 1
    if cfg.pipeline.export and stages:
        try:
            export_and_generate(cfg, stages[-1])
        except RuntimeError as exc:
            print(f"omni-train: {exc}", file=sys.stderr, flush=True)
            return 1
    _say(f"done in {time.perf_counter() - start:.1f}s; run directory: {cfg.run_dir}")
    return 0
