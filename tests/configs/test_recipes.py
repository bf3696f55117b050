"""Every recipe and every config-group option composes against the typed schema and validates."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from omni_train.config import CONF_DIR, DATA_SCHEMAS, TrainConfig, compose, validate_config
from omni_train.loops import check_stage
from omni_train.stages import STAGES, load_stage, phase_plan, stage_code

RECIPES = sorted(p.relative_to(CONF_DIR / "recipe").with_suffix("").as_posix()
                 for p in (CONF_DIR / "recipe").rglob("*.yaml"))
GROUPS = sorted((group.name, option.stem) for group in CONF_DIR.iterdir()
                if group.is_dir() and group.name != "recipe" for option in group.glob("*.yaml"))


@pytest.fixture
def demo_shards(synth_shards):
    """A real dataset + tokenizer for recipes that read shards (their paths are relative to the repo): the
    session's synthetic shards (tests/conftest.py), ROOT/good and ROOT/tok."""
    return synth_shards


def _compose(recipe, shards):
    cfg = compose([f"recipe={recipe}"])
    if cfg.data.name == "shards":  # point each of the recipe's datasets at a freshly built one
        datasets = ", ".join(f"{{path: {shards / 'good'}, weight: {d.weight}}}" for d in cfg.data.datasets)
        cfg = compose([f"recipe={recipe}", f"data.datasets=[{datasets}]", f"data.tokenizer={shards / 'tok'}"])
    return cfg


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_and_validates(recipe, demo_shards):
    cfg = _compose(recipe, demo_shards)
    first_line = (CONF_DIR / "recipe" / f"{recipe}.yaml").read_text().splitlines()[1]
    assert f"recipe={recipe}" in first_line, "a recipe's first comment is the command that runs it"
    on_gpu = cfg.trainer.device == "cuda"
    # full-scale recipes name the world they are written for (dry_run_world_size); tiny ones run on one process
    validate_config(cfg, world_size=cfg.dry_run_world_size or 1, cuda_available=on_gpu)
    OmegaConf.to_object(cfg)  # every value has its schema type


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_builds_its_stage(recipe, demo_shards):
    """Each recipe becomes the objects its run starts from: the typed TrainConfig, the data source's own
    schema, the registered stage code (its model, data and forward builders), a phase plan covering every
    step, and the stage checks the CLI runs before building anything."""
    cfg = OmegaConf.to_object(_compose(recipe, demo_shards))
    assert type(cfg) is TrainConfig
    assert type(cfg.data) is DATA_SCHEMAS[cfg.data.name], (type(cfg.data), cfg.data.name)
    check_stage(cfg)
    stage = load_stage(cfg.stage)
    module = __import__(STAGES[stage_code(cfg.stage)], fromlist=["STAGE"])
    assert stage is module.STAGE
    assert all(callable(f) for f in (stage.build_model, stage.build_data, stage.forward))
    plan = phase_plan(cfg.stage, cfg.trainer.max_steps)
    assert plan[0].start == 0 and plan[-1].end == cfg.trainer.max_steps
    assert all(a.end == b.start for a, b in zip(plan, plan[1:]))
    # a pipeline recipe runs recipes of its own: each of them is one of the recipes checked here
    assert {s.recipe for s in cfg.pipeline.stages} <= set(RECIPES)


def test_every_full_scale_recipe_has_its_dry_run_checked():
    """The full-scale recipes (those naming dry_run_world_size) are the ones whose dry run
    (print_dry_run: parameter counts, memory estimate) tests/configs/test_30b_recipes.py checks."""
    from tests.configs.test_30b_recipes import RECIPES as DRY_RUN_CHECKED
    from tests.configs.test_30b_talker_recipes import TALKER_RECIPES

    # distill_onpolicy and gspo (a rollout engine beside the policy) have their own dry-run tests there; the
    # Talker's recipes theirs in test_30b_talker_recipes.py
    full_scale = {r for r in RECIPES if compose([f"recipe={r}"]).dry_run_world_size}
    assert full_scale == {f"qwen3_omni_30b_a3b/{r}"
                          for r in [*DRY_RUN_CHECKED, "distill_onpolicy", "gspo", *TALKER_RECIPES]}


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
    """conf/stage/<x>.yaml <-> omni_train/stages/<x>.py, or <x>.yaml names the registered code it runs
    (stage.base: stages that differ only in configuration); every registered stage has its file and a
    config; every group has a schema field."""
    import yaml

    from omni_train.config.schema import TrainConfig
    from omni_train.stages import STAGES

    code = {}
    for path in (CONF_DIR / "stage").glob("*.yaml"):
        entry = yaml.safe_load(path.read_text())
        assert entry["name"] == path.stem
        code[path.stem] = entry.get("base") or entry["name"]
    assert set(code.values()) == set(STAGES)  # every registered stage is used, every config runs one
    assert set(STAGES) <= set(code)
    for name in STAGES:
        assert (Path(__file__).parents[2] / "omni_train" / "stages" / f"{name}.py").exists()
    assert {name for name, base in code.items() if base != name} == {
        "audio_align", "vision_align", "general_pretrain", "long_context", "sft", "talker_cpt"}
    fields = set(TrainConfig.__dataclass_fields__)
    assert {g for g, _ in GROUPS} <= fields
