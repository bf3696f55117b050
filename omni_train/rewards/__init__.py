"""Rewards for the stages that score their own samples (GSPO): rule functions and a model judge
(docs/rewards.md).

    from omni_train.rewards import RewardRequest, Rewarder, register

    @register("my_reward")                        # or name it "my_package.my_module:my_reward" in the recipe
    def my_reward(request: RewardRequest, **kwargs) -> float: ...

Files: registry.py (RewardRequest, the name -> function registry), rules.py and math_answer.py (the
built-in functions), judge.py (the openai and hf judges), media.py (media items for a judge), check.py
(config checks), rewarder.py (Rewarder, PendingRewards, RewardBatch).
"""

from omni_train.rewards import math_answer, rules  # noqa: F401  (registers the built-in functions)
from omni_train.rewards.judge import JudgeError, parse_score
from omni_train.rewards.registry import REWARDS, RewardFailed, RewardRequest, register, resolve
from omni_train.rewards.rewarder import PendingRewards, RewardBatch, Rewarder

__all__ = ["REWARDS", "JudgeError", "PendingRewards", "RewardBatch", "RewardFailed", "RewardRequest", "Rewarder",
           "parse_score", "register", "resolve"]
