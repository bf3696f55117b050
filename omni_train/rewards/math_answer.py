"""The ``math`` reward: is the response's final answer mathematically equal to the reference? Through
math-verify (Hugging Face's; trl's accuracy reward uses it): both sides parsed (LaTeX, \\boxed{}, plain
expressions) into sympy, then compared ("1/2" == "0.5" == "\\frac{1}{2}", "(x+1)^2" == "x^2+2x+1").

Timeout: math-verify's own timeout installs a SIGALRM handler, which Python allows on the main thread
only. Here one timer covers parse + parse + verify (math-verify's timeouts off), and it raises an exception
of our own that math-verify's internal ``except`` clauses do not swallow, so a timeout fails the sample
(counted) instead of scoring it 0. Off the main thread there is no timer (the Rewarder computes rule
rewards on the caller's thread, which is the main one in training).
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from omni_train.rewards.registry import RewardFailed, RewardRequest, register
from omni_train.rewards.rules import answer_text, reference_of


class _Timeout(BaseException):
    """Raised by the timer; BaseException so that no `except Exception` inside math-verify swallows it."""


@contextmanager
def _time_limit(seconds: float):
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise _Timeout()

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _check(kwargs, key: str) -> None:
    timeout_s = kwargs.get("timeout_s", 5.0)
    if not isinstance(timeout_s, (int, float)) or timeout_s < 0:
        raise ValueError(f"{key}.timeout_s: {timeout_s!r}, need seconds >= 0 (0: no limit)")


@register("math", check=_check)
def math_reward(request: RewardRequest, timeout_s: float = 5.0) -> float:
    """1 when the answer's last extractable expression equals the reference's, 0 when it differs or the
    answer holds none; RewardFailed when the reference holds none or math-verify runs past timeout_s."""
    import math_verify
    from math_verify import parse, verify

    # we time the calls ourselves (module docstring): silence math-verify's one-time "timeout disabled" warning
    math_verify.parser.TIMEOUT_WARNING_SHOWN = math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    reference = reference_of(request)
    try:
        with _time_limit(timeout_s):
            gold = parse(reference, parsing_timeout=None)
            if not gold:
                raise RewardFailed(f"math-verify finds no expression in the reference {reference[:60]!r}")
            answer = parse(answer_text(request.response), parsing_timeout=None)
            return float(bool(answer) and verify(gold, answer, timeout_seconds=None))
    except _Timeout:
        raise RewardFailed(f"math-verify ran past timeout_s={timeout_s}") from None
