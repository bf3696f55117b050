"""Scoring a batch of samples: rule functions and the judge -> RewardBatch, with failures counted.

    rewarder = Rewarder(cfg.stage.rewards)          # checks the config; cheap (an hf judge loads on first submit)
    pending = rewarder.submit(requests)             # rule rewards now, judge calls started in the background
    ...                                             # e.g. the old-policy log-probabilities
    batch = pending.result()                        # waits for the judge; RuntimeError past max_failure_rate

Rule functions run inside ``submit`` on the caller's thread: they take microseconds to milliseconds, pure
Python gains nothing from threads under the GIL, and math-verify's timer needs the main thread. The judge
is what takes time (seconds per request), and it runs in the background until ``result()``.

A sample's total is the weighted sum of the values of the functions applied to it; it is failed (NaN,
counted) when any of them failed (RewardFailed, a judge failure) or its spec is malformed. A function that
raises anything else is a bug: RuntimeError naming the function and the sample, and the run stops.
Counters (samples, failures, judge retries) are cumulative over the run and go into the checkpoint
(state_dict), so a resumed run stops at the same failure rate as an uninterrupted one.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from omni_train.config.rewards import RewardsConfig
from omni_train.rewards.check import check_rewards, function_entry, plain_config
from omni_train.rewards.judge import JudgeInput, JudgeOutcome, build_judge
from omni_train.rewards.registry import RewardFailed, RewardRequest, resolve

SPEC_KEYS = ("reference", "functions", "weights")
COUNTERS = ("samples", "failed_samples", "judge_calls", "judge_failures", "judge_retries")


@dataclass
class RewardBatch:
    total: np.ndarray  # float64 [N], the weighted sum; NaN where failed
    failed: np.ndarray  # bool [N]
    per_function: Dict[str, np.ndarray]  # float64 [N] per function (and the judge); NaN where failed or not applied
    stats: Dict[str, float]  # reward/<name>_mean, reward/<name>_std, reward/failure_rate (cumulative), ...
    applied: Dict[str, np.ndarray] = field(default_factory=dict)  # bool [N]: the function scored this sample
    errors: List[str] = field(default_factory=list)  # why each sample failed ("" when it did not)
    judge_replies: List[Optional[str]] = field(default_factory=list)  # the judge's last reply per sample


@dataclass
class _Plan:
    request: RewardRequest  # reference resolved from the spec
    functions: List[Tuple[str, float, Dict[str, Any]]]  # (name, weight, kwargs), judge included
    error: str = ""  # a malformed spec: the sample fails


class PendingRewards:
    def __init__(self, rewarder: "Rewarder", plans: List[_Plan], values: Dict[str, np.ndarray],
                 errors: List[str], judge_rows: List[int], futures: List[Future]):
        self._rewarder, self._plans, self._values, self._errors = rewarder, plans, values, errors
        self._judge_rows, self._futures = judge_rows, futures
        self._batch: Optional[RewardBatch] = None
        self._error: Optional[Exception] = None

    def result(self) -> RewardBatch:
        """Waits for the judge; the batch (the same object when called again). Raises RuntimeError when the
        run's failure rate passes max_failure_rate, JudgeError when the judge cannot be used at all."""
        if self._batch is not None:
            return self._batch
        if self._error is not None:  # counted once: asking again raises the same error
            raise self._error
        try:
            self._batch = self._collect()
        except Exception as exc:
            self._error = exc
            raise
        return self._batch

    def _collect(self) -> RewardBatch:
        start = time.perf_counter()
        outcomes: List[JudgeOutcome] = [o for f in self._futures for o in f.result()]
        wait_s = time.perf_counter() - start
        name = self._rewarder.cfg.judge.name
        replies: List[Optional[str]] = [None] * len(self._plans)
        for row, outcome in zip(self._judge_rows, outcomes):
            replies[row] = outcome.reply
            if outcome.score is None:
                self._errors[row] = self._errors[row] or outcome.error
            else:
                self._values[name][row] = outcome.score
        return self._rewarder._finish(self._plans, self._values, self._errors, outcomes, replies, wait_s)


class Rewarder:
    def __init__(self, cfg: RewardsConfig, key: str = "stage.rewards"):
        """Checks cfg (ValueError naming the key). An hf judge is loaded on the first submit that needs it."""
        self.cfg, self.key = plain_config(cfg), key
        check_rewards(self.cfg, key)
        self._recipe = {f.name: (f.weight, dict(f.kwargs)) for f in self.cfg.functions}
        self._judge = build_judge(self.cfg.judge)
        self._lock = threading.Lock()
        self._counts: Dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._function_failures: Counter = Counter()
        self._reasons: Counter = Counter()

    @staticmethod
    def check(cfg: RewardsConfig, key: str = "stage.rewards") -> None:
        """ValueError naming the key of the first bad setting; no model is loaded, no request is sent."""
        check_rewards(plain_config(cfg), key)

    # ------------------------------------------------------------------------------------------ scoring
    def submit(self, requests: List[RewardRequest]) -> PendingRewards:
        plans = [self._plan(r) for r in requests]
        n, judge = len(plans), self.cfg.judge.name
        names = list(dict.fromkeys(name for p in plans for name, _, _ in p.functions))
        values = {name: np.full(n, np.nan) for name in names}
        errors = [p.error for p in plans]
        judge_rows = [i for i, p in enumerate(plans) if not p.error and any(f[0] == judge for f in p.functions)]
        futures = self._judge.submit([JudgeInput(plans[i].request.question, plans[i].request.response,
                                                 plans[i].request.reference, list(plans[i].request.media))
                                      for i in judge_rows]) if judge_rows else []
        try:
            for i, plan in enumerate(plans):
                for name, _, kwargs in plan.functions:
                    if name != judge and not plan.error:
                        value, error = _call(name, kwargs, plan.request)
                        values[name][i] = value
                        errors[i] = errors[i] or error
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return PendingRewards(self, plans, values, errors, judge_rows, futures)

    def _plan(self, request: RewardRequest) -> _Plan:
        """The functions, weights and reference of one sample: the recipe's, changed by its spec."""
        spec = request.spec or {}
        functions = [(name, w, kw) for name, (w, kw) in self._recipe.items()]
        if self._judge is not None:
            functions.append((self.cfg.judge.name, self.cfg.judge.weight, {}))
        where = self.cfg.spec_key
        try:
            if not isinstance(spec, dict):
                raise ValueError(f"{where}: a mapping with {SPEC_KEYS}, not {type(spec).__name__}")
            unknown = sorted(set(spec) - set(SPEC_KEYS))
            if unknown:
                raise ValueError(f"{where}: unknown keys {unknown}; known: {list(SPEC_KEYS)}")
            if "functions" in spec and not isinstance(spec["functions"], list):
                raise ValueError(f"{where}.functions: a list of names or {{name, weight, kwargs}}")
            if "functions" in spec:
                functions = [self._spec_entry(entry, f"{where}.functions[{i}]")
                             for i, entry in enumerate(spec["functions"] or [])]
            weights = dict(spec.get("weights") or {})
            names = [f[0] for f in functions]
            for name, weight in weights.items():
                if name not in names:
                    raise ValueError(f"{where}.weights: {name!r} is not among this sample's functions {names}")
                if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                    raise ValueError(f"{where}.weights.{name}: {weight!r}, need a finite number")
            functions = [(name, float(weights.get(name, w)), kw) for name, w, kw in functions]
        except (ValueError, TypeError, AttributeError) as exc:
            return _Plan(request, [], f"spec: {exc}")
        reference = spec.get("reference", request.reference)
        return _Plan(replace(request, reference=None if reference is None else str(reference)), functions)

    def _spec_entry(self, entry: Any, where: str) -> Tuple[str, float, Dict[str, Any]]:
        judge = self.cfg.judge.name
        name = entry if isinstance(entry, str) else entry.get("name") if isinstance(entry, dict) else None
        if name == judge:
            if self._judge is None:
                raise ValueError(f"{where}: {judge!r}, but {self.key}.judge.backend is none")
            weight, kwargs = self.cfg.judge.weight, {}
        else:
            weight, kwargs = self._recipe.get(name, (1.0, {}))
        if isinstance(entry, dict):
            weight, kwargs = entry.get("weight", weight), entry.get("kwargs", kwargs)
            entry = dict(entry, weight=weight, kwargs=kwargs)
        if name != judge:
            function_entry(entry, where)  # ValueError for an unknown name or kwargs it cannot take
        return name, float(weight), dict(kwargs)

    # ------------------------------------------------------------------------------------------ results
    def _finish(self, plans: List[_Plan], values: Dict[str, np.ndarray], errors: List[str],
                outcomes: List[JudgeOutcome], replies: List[Optional[str]], wait_s: float) -> RewardBatch:
        n = len(plans)
        applied = {name: np.zeros(n, bool) for name in values}
        total = np.zeros(n)
        for i, plan in enumerate(plans):
            for name, weight, _ in plan.functions:
                applied[name][i] = True
                total[i] += weight * values[name][i]
        failed = np.array([bool(e) for e in errors], bool) | np.isnan(total)
        total[failed] = np.nan
        judge_failures = sum(o.score is None for o in outcomes)
        judge_retries = sum(o.retries for o in outcomes)
        with self._lock:
            c = self._counts
            c["samples"] += n
            c["failed_samples"] += int(failed.sum())
            c["judge_calls"] += len(outcomes)
            c["judge_failures"] += judge_failures
            c["judge_retries"] += judge_retries
            for name in values:
                self._function_failures[name] += int((applied[name] & np.isnan(values[name])).sum())
            self._reasons.update(_reason(e) for e in errors if e)
            rate = c["failed_samples"] / max(c["samples"], 1)
            counts, reasons = dict(c), self._reasons.most_common(3)
        stats = {"reward/failed_samples": float(failed.sum()), "reward/failure_rate": rate,
                 "reward/judge_failures": float(judge_failures), "reward/judge_retries": float(judge_retries),
                 "reward/judge_wait_s": wait_s}
        for name, column in [("total", total), *values.items()]:
            good = column[~np.isnan(column)]
            if good.size:
                stats[f"reward/{name}_mean"], stats[f"reward/{name}_std"] = float(good.mean()), float(good.std())
        if counts["samples"] >= self.cfg.min_samples_for_failure_rate and rate > self.cfg.max_failure_rate:
            listed = "; ".join(f"{k} x{v}" for k, v in reasons)
            raise RuntimeError(
                f"rewards: {counts['failed_samples']} of {counts['samples']} samples failed ({rate:.1%}), more than "
                f"{self.key}.max_failure_rate={self.cfg.max_failure_rate} (judge: {counts['judge_failures']} "
                f"failed of {counts['judge_calls']} calls, {counts['judge_retries']} retries). Most common: {listed}")
        return RewardBatch(total, failed, values, stats, applied, errors, replies)

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        with self._lock:
            return {**self._counts, "function_failures": dict(self._function_failures),
                    "reasons": dict(self._reasons.most_common(20))}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        with self._lock:
            self._counts = {k: int(state.get(k, 0)) for k in COUNTERS}
            self._function_failures = Counter({k: int(v) for k, v in (state.get("function_failures") or {}).items()})
            self._reasons = Counter({k: int(v) for k, v in (state.get("reasons") or {}).items()})

    def close(self) -> None:
        """Stops the judge's threads (calls in flight are abandoned)."""
        if self._judge is not None:
            self._judge.close()

    def __enter__(self) -> "Rewarder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _call(name: str, kwargs: Dict[str, Any], request: RewardRequest) -> Tuple[float, str]:
    """(value, "") or (NaN, why it failed); RuntimeError naming function and sample for a bug."""
    try:
        value = resolve(name)(request, **kwargs)
    except RewardFailed as exc:
        return math.nan, f"{name}: {exc}"
    except Exception as exc:
        raise RuntimeError(f"reward function {name!r} raised on sample {request.key!r}: "
                           f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(float(value)):
        raise RuntimeError(f"reward function {name!r} returned {value!r} for sample {request.key!r}: "
                           f"need a finite number (raise RewardFailed to fail the sample)")
    return float(value), ""


def _reason(error: str) -> str:
    """An error shortened to its kind, for counting: up to its first quote or parenthesis ("judge: timed
    out", "judge: no score in the reply", "math: math-verify ran past timeout_s=5")."""
    return re.split(r"[\'\"({]", error)[0].rstrip(" [:")[:80]
