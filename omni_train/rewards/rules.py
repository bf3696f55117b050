"""Rule rewards on the response text: exact_match, normalized_match, multiple_choice, think_format,
length_penalty (math is in math_answer.py).

The answer of a response is its text after the last ``</think>`` (the reasoning is not the answer: a
number in it must not count as the answer). The functions that compare with a reference raise
RewardFailed when the sample has none: the data is wrong, not the response.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Dict, Optional

from omni_train.rewards.registry import RewardFailed, RewardRequest, register

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def answer_text(response: str) -> str:
    """The response without its reasoning: what follows the last </think> (all of it when there is none)."""
    return response.rsplit(THINK_CLOSE, 1)[-1].strip()


def reference_of(request: RewardRequest) -> str:
    if request.reference is None:
        raise RewardFailed("no reference answer (prompt reference or spec 'reference')")
    return str(request.reference)


@register("exact_match")
def exact_match(request: RewardRequest) -> float:
    """1 when the answer equals the reference (surrounding whitespace aside), else 0."""
    return float(answer_text(request.response) == reference_of(request).strip())


def normalize_text(text: str) -> str:
    """Lower case, punctuation and symbols dropped (Unicode categories P* and S*), whitespace collapsed."""
    kept = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in unicodedata.normalize("NFKC", text))
    return " ".join(kept.lower().split())


@register("normalized_match")
def normalized_match(request: RewardRequest) -> float:
    """exact_match, insensitive to case, whitespace and punctuation ("Paris." == " paris")."""
    return float(normalize_text(answer_text(request.response)) == normalize_text(reference_of(request)))


def _choice_patterns(letters: str):
    c = f"[{letters}]"
    return [  # in priority order; within one, the last occurrence counts (a final answer follows the work)
        rf"\\boxed\{{\s*\(?({c})\)?\s*\}}",
        rf"(?i:answer|option|choice)(?:\s+is)?\s*[:：]?\s*(?:\*\*)?\s*\(?({c})\)?(?![A-Za-z])",
        rf"\A\s*\(?({c})\)?\s*(?:[.):：]|\Z)",  # the answer opens with the letter: "B", "(B)", "B. Paris"
        rf"\(({c})\)",  # a lone parenthesised letter anywhere
    ]


def extract_choice(text: str, letters: str = "ABCDE") -> Optional[str]:
    """The chosen letter in common phrasings ("The answer is (B)", "Answer: C", "\\boxed{D}", "B. Paris",
    "(E)"), or None. A parenthesised letter anywhere counts only when it is the only one."""
    for i, pattern in enumerate(_choice_patterns(letters)):
        found = re.findall(pattern, text)
        if i == 3 and len(set(found)) != 1:
            return None
        if found:
            return found[-1]
    return None


def _check_letters(kwargs: Dict[str, Any], key: str) -> None:
    letters = kwargs.get("letters", "ABCDE")
    if not (isinstance(letters, str) and letters.isalpha() and letters.isupper()):
        raise ValueError(f"{key}.letters: {letters!r}, need capital letters such as 'ABCDE'")


@register("multiple_choice", check=_check_letters)
def multiple_choice(request: RewardRequest, letters: str = "ABCDE") -> float:
    """1 when the letter chosen in the answer is the reference's letter, 0 when another or none is chosen."""
    expected = extract_choice(reference_of(request).strip(), letters)
    if expected is None:
        raise RewardFailed(f"no choice letter ({letters}) in the reference {reference_of(request)[:40]!r}")
    return float(extract_choice(answer_text(request.response), letters) == expected)


@register("think_format")
def think_format(request: RewardRequest, prompt_opens_think: bool = False) -> float:
    """1 for `<think>reasoning</think>answer`: one reasoning block first, a non-empty answer after it.
    ``prompt_opens_think``: the prompt already ends with <think> (the response starts inside it)."""
    text = request.response if not prompt_opens_think else THINK_OPEN + request.response
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return 0.0
    return float(re.fullmatch(r"\s*<think>.*?</think>\s*\S.*", text, flags=re.DOTALL) is not None)


def _check_length(kwargs: Dict[str, Any], key: str) -> None:
    max_length, cache = kwargs.get("max_length"), kwargs.get("cache")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"{key}.max_length: {max_length!r}, need the longest response (tokens) without penalty, > 0")
    if not isinstance(cache, int) or not 0 < cache <= max_length:
        raise ValueError(f"{key}.cache: {cache!r}, need 0 < cache <= max_length ({max_length})")


@register("length_penalty", check=_check_length)
def length_penalty(request: RewardRequest, max_length: int, cache: int) -> float:
    """DAPO's soft overlong punishment on the response's token count L: 0 up to max_length - cache, then
    falling linearly to -1 at max_length, -1 beyond."""
    if request.response_tokens is None:
        raise ValueError("RewardRequest.response_tokens is None: length_penalty needs the response's length in tokens")
    length, free = request.response_tokens, max_length - cache
    if length <= free:
        return 0.0
    if length <= max_length:
        return (free - length) / cache
    return -1.0
