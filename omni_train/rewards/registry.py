"""What a reward function receives and how it is found by name.

A reward function is ``f(request: RewardRequest, **kwargs) -> float``. It is found by its registered name
(``@register("name")``) or, for a user's own function, by ``"module.path:function"``, imported on first
use. It raises ``RewardFailed`` when it cannot score a sample (no reference, a timeout): that sample is
failed and counted, never scored 0. Any other exception is a bug and stops the run (Rewarder).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

RewardFn = Callable[..., float]

REWARDS: Dict[str, RewardFn] = {}
# name -> check(kwargs, key): ValueError naming key for kwargs the function cannot take (Rewarder.check)
KWARG_CHECKS: Dict[str, Callable[[Dict[str, Any], str], None]] = {}


class RewardFailed(Exception):
    """This sample gets no value from this function; the message says why (counted, never scored 0)."""


@dataclass
class RewardRequest:
    key: str  # the sample's key, for messages
    question: str  # the prompt's text (the judge's {question})
    response: str  # the generated text, reasoning included as generated
    reference: Optional[str]  # the reference answer (Prompt.reference); spec["reference"] overrides it
    spec: Dict[str, Any] = field(default_factory=dict)  # the sample's own reward spec (RewardsConfig.spec_key)
    media: List[Any] = field(default_factory=list)  # for a judge that sees media (rewards/media.py)
    response_tokens: Optional[int] = None  # the response's length in tokens (length_penalty)


def register(name: str, check: Optional[Callable[[Dict[str, Any], str], None]] = None):
    """Decorator: ``@register("my_reward")`` makes ``def f(request, **kwargs) -> float`` usable by name.
    ``check(kwargs, key)`` (optional) validates the recipe's kwargs before any compute."""
    def decorate(fn: RewardFn) -> RewardFn:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"reward function {name!r} is already registered ({REWARDS[name].__module__})")
        REWARDS[name] = fn
        if check is not None:
            KWARG_CHECKS[name] = check
        return fn
    return decorate


def resolve(name: str) -> RewardFn:
    """A registered name or "module.path:function" -> the function (ValueError when there is none)."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ValueError(f"unknown reward function {name!r}; registered: {sorted(REWARDS)}, or give "
                         f"'module.path:function'")
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import reward function {name!r}: {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"reward function {name!r} is not callable")
    return fn
