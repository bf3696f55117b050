"""Configuration: schemas registered in Hydra's ConfigStore, composition, and up-front validation."""

from omni_train.config.schema import (
    CheckpointConfig,
    ClusterConfig,
    DataConfig,
    DatasetConfig,
    FrozenModelConfig,
    LauncherConfig,
    LoggerConfig,
    ModelConfig,
    TalkerConfig,
    ThinkerConfig,
    OptimConfig,
    ParallelConfig,
    StageConfig,
    TrainConfig,
    TrainerConfig,
)
from omni_train.config.compose import CONF_DIR, ConfigError, compose, register_schemas
from omni_train.config.validate import validate_config

__all__ = [
    "CONF_DIR",
    "CheckpointConfig",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "DatasetConfig",
    "FrozenModelConfig",
    "LauncherConfig",
    "LoggerConfig",
    "ModelConfig",
    "TalkerConfig",
    "ThinkerConfig",
    "OptimConfig",
    "ParallelConfig",
    "StageConfig",
    "TrainConfig",
    "TrainerConfig",
    "compose",
    "register_schemas",
    "validate_config",
]
