"""Compose a run's config with Hydra, and turn composition failures into one-line errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import List

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from omni_train.config.schema import DATA_SCHEMAS, TrainConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PRIMARY = "config"


class ConfigError(ValueError):
    """A configuration problem, reported as one line that names the offending key."""

    def __init__(self, key: str, problem: str):
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


def register_schemas() -> None:
    """Register the typed schema that conf/config.yaml extends (`defaults: [train_schema, ...]`) and each
    data source's, which its conf/data/<name>.yaml extends (`defaults: [<name>_schema, _self_]`)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name, schema in DATA_SCHEMAS.items():
        store.store(group="data", name=f"{name}_schema", node=schema)


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "invalid value")


def as_config_error(exc: BaseException) -> ConfigError:
    """Map a Hydra / OmegaConf exception onto the key it is about."""
    cause = exc
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        key = getattr(cause, "full_key", None) or "config"
        return ConfigError(str(key), _first_line(getattr(cause, "msg", None) or cause))
    message = _first_line(exc).removeprefix("In 'config': ")
    missing = re.search(r"Could not find '([^']+)/([^']+)'", message)
    if missing:  # an unknown choice for a config group: name the group
        return ConfigError(missing.group(1), f"no option {missing.group(2)!r} in conf/{missing.group(1)}/")
    # Otherwise Hydra names the override in quotes: "Could not override 'trainer.foo'."
    quoted = re.search(r"'([^']+)'", message)
    return ConfigError(quoted.group(1) if quoted else "config", message)


def compose(overrides: List[str]) -> DictConfig:
    """Compose conf/config.yaml with command-line style overrides, as the Hydra app would."""
    register_schemas()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name=PRIMARY, overrides=list(overrides))
    except Exception as exc:  # Hydra raises several unrelated types for bad overrides.
        raise as_config_error(exc) from exc
