"""Up-front checks of ``stage.rewards``: a ValueError naming the key of the first bad setting, before any
model is loaded or request sent (Rewarder.check, also run by Rewarder.__init__)."""

from __future__ import annotations

import inspect
import math
import os
import re
from typing import Any

from omni_train.config.rewards import JUDGE_BACKENDS, JudgeConfig, RewardFunctionConfig, RewardsConfig
from omni_train.rewards.registry import KWARG_CHECKS, resolve

DTYPES = ("auto", "bf16", "fp16", "fp32")


def plain_config(cfg: Any) -> RewardsConfig:
    """A RewardsConfig from itself or an OmegaConf node of its schema (as Hydra composes stage.rewards)."""
    if isinstance(cfg, RewardsConfig):
        return cfg
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RewardsConfig), cfg))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def function_entry(entry: Any, key: str) -> None:
    """One function entry (RewardFunctionConfig or a spec's {name, weight, kwargs} / name): ValueError naming
    key for an unknown name, a non-finite weight or kwargs the function cannot take."""
    if isinstance(entry, str):
        entry = {"name": entry}
    if isinstance(entry, RewardFunctionConfig):
        entry = {"name": entry.name, "weight": entry.weight, "kwargs": entry.kwargs}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise ValueError(f"{key}: need a function name or {{name, weight, kwargs}}, got {entry!r}")
    name, weight, kwargs = entry["name"], entry.get("weight", 1.0), entry.get("kwargs") or {}
    try:
        fn = resolve(name)
    except ValueError as exc:
        raise ValueError(f"{key}.name: {exc}") from None
    if not _finite(weight):
        raise ValueError(f"{key}.weight: {weight!r}, need a finite number")
    if not isinstance(kwargs, dict):
        raise ValueError(f"{key}.kwargs: a mapping, not {type(kwargs).__name__}")
    try:
        inspect.signature(fn).bind(None, **kwargs)
    except TypeError as exc:
        raise ValueError(f"{key}.kwargs: {name} cannot take {sorted(kwargs)}: {exc}") from None
    if name in KWARG_CHECKS:
        KWARG_CHECKS[name](kwargs, f"{key}.kwargs")


def check_rewards(cfg: RewardsConfig, key: str = "stage.rewards") -> None:
    names = [f.name for f in cfg.functions]
    for i, entry in enumerate(cfg.functions):
        function_entry(entry, f"{key}.functions[{i}]")
        if entry.name in names[:i]:
            raise ValueError(f"{key}.functions[{i}].name: {entry.name!r} appears twice")
        if entry.name == cfg.judge.name:
            raise ValueError(f"{key}.functions[{i}].name: {entry.name!r} is the judge's name ({key}.judge.name)")
    if not cfg.functions and cfg.judge.backend == "none":
        raise ValueError(f"{key}.functions: empty and {key}.judge.backend is none: nothing gives a reward")
    if not (_finite(cfg.max_failure_rate) and 0.0 <= cfg.max_failure_rate <= 1.0):
        raise ValueError(f"{key}.max_failure_rate: {cfg.max_failure_rate!r}, need a share in [0, 1]")
    if not isinstance(cfg.min_samples_for_failure_rate, int) or cfg.min_samples_for_failure_rate < 1:
        raise ValueError(f"{key}.min_samples_for_failure_rate: {cfg.min_samples_for_failure_rate!r}, need >= 1")
    if not isinstance(cfg.spec_key, str) or not cfg.spec_key:
        raise ValueError(f"{key}.spec_key: {cfg.spec_key!r}, need the JSON field of a sample's reward spec")
    check_judge(cfg.judge, f"{key}.judge")


def check_judge(judge: JudgeConfig, key: str) -> None:
    if judge.backend not in JUDGE_BACKENDS:
        raise ValueError(f"{key}.backend: {judge.backend!r}, need one of {JUDGE_BACKENDS}")
    if judge.backend == "none":
        return
    if judge.backend == "hf":
        if not judge.path or not os.path.isfile(os.path.join(judge.path, "config.json")):
            raise ValueError(f"{key}.path: {judge.path!r}, need a local Hugging Face model directory "
                             f"(with config.json) for backend hf")
        if judge.dtype not in DTYPES:
            raise ValueError(f"{key}.dtype: {judge.dtype!r}, need one of {DTYPES}")
    if judge.backend == "openai":
        if not judge.url or not re.match(r"https?://", judge.url):
            raise ValueError(f"{key}.url: {judge.url!r}, need the server's base URL, e.g. http://host:8000/v1")
        if not judge.model:
            raise ValueError(f"{key}.model: empty, need the served model name (vllm serve --served-model-name)")
        if judge.api_key_env and not os.environ.get(judge.api_key_env):
            raise ValueError(f"{key}.api_key_env: the environment variable {judge.api_key_env} is not set")
    try:
        filled = judge.template.format(question="", response="\0", reference="")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"{key}.template: cannot fill it ({type(exc).__name__}: {exc}); placeholders are "
                         f"{{question}} {{response}} {{reference}}, a literal brace is {{{{ or }}}}") from None
    if "\0" not in filled:
        raise ValueError(f"{key}.template: no {{response}} placeholder: the judge would not see the response")
    try:
        groups = re.compile(judge.score_pattern).groups
    except re.error as exc:
        raise ValueError(f"{key}.score_pattern: not a regular expression ({exc})") from None
    if groups < 1:
        raise ValueError(f"{key}.score_pattern: {judge.score_pattern!r} has no group: group 1 is the score")
    for name, low, inclusive in (("max_score", 0, False), ("temperature", 0, True), ("timeout_s", 0, False),
                                 ("backoff_s", 0, True), ("weight", -math.inf, True)):
        value = getattr(judge, name)
        if not _finite(value) or (value < low if inclusive else value <= low):
            raise ValueError(f"{key}.{name}: {value!r}, need a finite number {'>=' if inclusive else '>'} {low}")
    for name, low in (("max_tokens", 1), ("retries", 0), ("concurrency", 1), ("batch_size", 1)):
        value = getattr(judge, name)
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{key}.{name}: {value!r}, need an integer >= {low}")
    if not judge.name:
        raise ValueError(f"{key}.name: empty, need the judge's key in the per-function results")
