"""Every recipe and every config-group option composes against the typed schema and validates."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from omni_train.config import CONF_DIR, compose, validate_config

RECIPES = sorted(p.relative_to(CONF_DIR / "recipe").with_suffix("").as_posix()
                 for p in (CONF_DIR / "recipe").rglob("*.yaml"))
GROUPS = sorted((group.name, option.stem) for group in CONF_DIR.iterdir()
                if group.is_dir() and group.name != "recipe" for option in group.glob("*.yaml"))


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    """A real dataset + tokenizer for recipes that read shards (their paths are relative to the repo)."""
    from data_pipelines.cli import main as omni_data

    root = tmp_path_factory.mktemp("demo")
    assert omni_data(["synth", str(root / "demo"), "--samples", "4", "--tokenizer", str(root / "tok"),
                      "--no-progress"]) == 0
    return root


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_validates(recipe, demo_shards):
    cfg = compose([f"recipe={recipe}"])
    if cfg.data.name == "shards":  # point each of the recipe's datasets at a freshly built one
        datasets = ", ".join(f"{{path: {demo_shards / 'demo'}, weight: {d.weight}}}" for d in cfg.data.datasets)
        cfg = compose([f"recipe={recipe}", f"data.datasets=[{datasets}]", f"data.tokenizer={demo_shards / 'tok'}"])
    first_line = (CONF_DIR / "recipe" / f"{recipe}.yaml").read_text().splitlines()[1]
    assert f"recipe={recipe}" in first_line, "a recipe's first comment is the command that runs it"
    on_gpu = cfg.trainer.device == "cuda"
    # full-scale recipes name the world they are written for (dry_run_world_size); tiny ones run on one process
    validate_config(cfg, world_size=cfg.dry_run_world_size or 1, cuda_available=on_gpu)
    OmegaConf.to_object(cfg)  # every value has its schema type


@pytest.mark.parametrize("group,option", GROUPS)
def test_group_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg[group] is not None


def test_default_is_the_tiny_text_recipe():
    cfg = compose([])
    assert cfg.model.flavor == "tiny" and cfg.stage.name == "text_pretrain"
    assert cfg.trainer.log_every == 1 and cfg.trainer.max_steps == 100


def test_overrides_users_rely_on():
    cfg = compose(["trainer.max_steps=7", "trainer.log_every=3", "trainer.stop_at_step=5", "run_dir=/x/y",
                   "parallel.tp=2", "parallel.pp=2", "parallel.ep=2", "parallel.cp=2", "logger=wandb",
                   "optim.lr=0.5"])
    assert (cfg.trainer.max_steps, cfg.trainer.log_every, cfg.trainer.stop_at_step) == (7, 3, 5)
    assert cfg.run_dir == "/x/y" and cfg.optim.lr == 0.5 and cfg.logger.name == "wandb"
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.cp) == (2, 2, 2, 2)


def test_conf_groups_map_onto_code():
    """conf/stage/<x>.yaml <-> omni_train/stages/<x>.py; every group has a schema field."""
    from omni_train.config.schema import TrainConfig
    from omni_train.stages import STAGES

    stages = {p.stem for p in (CONF_DIR / "stage").glob("*.yaml")}
    assert stages == set(STAGES)
    for name in stages:
        assert (Path(__file__).parents[2] / "omni_train" / "stages" / f"{name}.py").exists()
    fields = set(TrainConfig.__dataclass_fields__)
    assert {g for g, _ in GROUPS} <= fields
