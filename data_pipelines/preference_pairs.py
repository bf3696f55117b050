"""`omni-data preference-pairs`: scored candidate responses per prompt -> DPO pairs (docs/data_format.md).

IN is a dataset directory (shards + index.json) or a JSONL manifest whose samples carry `candidates`:
assistant responses to the conversation, each with a `scores` dict (WER, speaker similarity, a judge's
grade: computed elsewhere). Each candidate's score is `sign * sum(weight * scores[key])` over the
`--score KEY[:WEIGHT]` options (sign -1 with `--lower-is-better`), higher is better. Candidates are ranked
by that score (ties: the earlier candidate first), the rule proposes pairs, pairs whose gap is not above 0
and at least `min_margin` are dropped, the rest are ordered by gap (largest first, ties by rank) and cut
to `max_pairs`. Every pair becomes one sample `{"messages": <the prompt>, "preference": {"chosen",
"rejected"}}` written through `build.build` (media decoded, renumbered, codec targets carried over;
resumable, identical bytes on a rerun).

A prompt that gives no pair is counted under one reason and listed in `preference_report.jsonl`, as is a
pair the build rejects (undecodable media): nothing is dropped unnamed.
"""

import copy
import hashlib
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

from data_pipelines import shards
from data_pipelines.build import build
from data_pipelines.samples import BadEntry
from data_pipelines.sources import Item, ManifestSource

RULES = ("best-worst", "all-pairs", "best-vs-rest")
REPORT_NAME = "preference_report.jsonl"
FEWER, NO_PAIR, MISSING, BAD = "fewer than 2 candidates", "no pair above the margin", "missing score", "bad sample"
SKIP_REASONS = (FEWER, NO_PAIR, MISSING, BAD)
BAD_PAIR = "bad pair"  # a pair the build rejected (its media or JSON)
DROPPED_FIELDS = ("messages", "candidates", "preference", "teacher", "meta")
DROPPED_META = ("source", "line", "row", "key", "shard", "pair")


@dataclass
class PairOptions:
    scores: list  # [(key, weight)]: the score is sign * sum(weight * scores[key])
    rule: str = "best-worst"
    min_margin: float = 0.0
    max_pairs: int = 0  # per prompt; 0: no limit
    lower_is_better: bool = False

    def __post_init__(self):
        if not self.scores:
            raise ValueError("give at least one --score KEY[:WEIGHT]")
        if self.rule not in RULES:
            raise ValueError(f"--rule {self.rule!r} is not one of {', '.join(RULES)}")
        if self.min_margin < 0 or self.max_pairs < 0:
            raise ValueError("need --min-margin >= 0 and --max-pairs-per-prompt >= 0")


@dataclass
class PairsRun:
    prompts: int = 0  # prompts read
    paired: int = 0  # prompts that gave at least one pair
    pairs: int = 0  # pairs written
    skipped: Counter = field(default_factory=Counter)  # reason -> prompts
    report: list = field(default_factory=list)  # one dict per skipped prompt or failed pair
    index: dict = None


class Skip(Exception):
    """This prompt gives no pair: args are (reason, detail)."""


def parse_score(text):
    """`wer` -> ("wer", 1.0); `wer:-1` -> ("wer", -1.0)."""
    key, sep, weight = text.rpartition(":") if ":" in text else (text, "", "1")
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not key or not math.isfinite(value):
        raise ValueError(f"--score takes KEY or KEY:WEIGHT (a number), got {text!r}")
    return key, value


def candidate_score(candidate, number, options):
    sign = -1.0 if options.lower_is_better else 1.0
    scores = candidate.get("scores")
    total = 0.0
    for key, weight in options.scores:
        value = scores.get(key) if isinstance(scores, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            got = "no" if value is None else f"{value!r} as"
            raise Skip(MISSING, f"candidate {number} has {got} score {key!r}")
        total += weight * value
    return sign * total


def choose_pairs(scores, options):
    """[(chosen, rejected, gap)] as candidate indices, by the rule, margin and limit (module doc)."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    rank = {c: r for r, c in enumerate(ranked)}
    if options.rule == "best-worst":
        proposed = [(ranked[0], ranked[-1])]
    elif options.rule == "best-vs-rest":
        proposed = [(ranked[0], j) for j in ranked[1:]]
    else:
        proposed = [(ranked[a], ranked[b]) for a in range(len(ranked)) for b in range(a + 1, len(ranked))]
    pairs = []
    for chosen, rejected in proposed:
        gap = round(scores[chosen] - scores[rejected], 12)  # 0.3 - 0.1 meets a 0.2 margin
        if gap > 0 and gap >= options.min_margin:
            pairs.append((chosen, rejected, gap))
    pairs.sort(key=lambda p: (-p[2], rank[p[0]], rank[p[1]]))
    return pairs[:options.max_pairs] if options.max_pairs else pairs


def prompt_pairs(sample, options):
    """One input sample -> [pair entry]; raises Skip(reason, detail)."""
    if not isinstance(sample, dict):
        raise Skip(BAD, f"sample must be a JSON object, got {type(sample).__name__}")
    messages, candidates = sample.get("messages"), sample.get("candidates")
    users = [i for i, m in enumerate(messages or []) if isinstance(m, dict) and m.get("role") == "user"]
    if not isinstance(messages, list) or not users:
        raise Skip(BAD, "`messages` must be a list with a user turn")
    if not isinstance(candidates, list):
        raise Skip(BAD, "`candidates` must be a list of {messages, scores}")
    for number, candidate in enumerate(candidates):
        turns = candidate.get("messages") if isinstance(candidate, dict) else None
        if not isinstance(turns, list) or not turns or not all(
                isinstance(m, dict) and m.get("role") == "assistant" for m in turns):
            raise Skip(BAD, f"candidate {number}: `messages` must be a non-empty list of assistant turns")
    if len(candidates) < 2:
        raise Skip(FEWER, f"{len(candidates)} candidate(s)")
    scores = [candidate_score(c, n, options) for n, c in enumerate(candidates)]
    pairs = choose_pairs(scores, options)
    if not pairs:
        raise Skip(NO_PAIR, f"largest gap {max(scores) - min(scores):.6g}, margin {options.min_margin:g}")
    rest = {k: v for k, v in sample.items() if k not in DROPPED_FIELDS}
    meta = sample.get("meta") if isinstance(sample.get("meta"), dict) else {}
    meta = {k: v for k, v in meta.items() if k not in DROPPED_META}
    prompt = messages[:users[-1] + 1]
    return [{"messages": copy.deepcopy(prompt), **copy.deepcopy(rest),
             "preference": {"chosen": copy.deepcopy(candidates[c]["messages"]),
                            "rejected": copy.deepcopy(candidates[r]["messages"])},
             "meta": {**meta, "pair": {"chosen": c, "rejected": r, "gap": gap,
                                       "scores": [round(scores[c], 12), round(scores[r], 12)]}}}
            for c, r, gap in pairs]


def _manifest_prompts(path):
    """(label, sample or Skip, at, size, identity) per non-blank manifest line."""
    reader = ManifestSource(path)
    for item in reader.items():
        try:
            sample = reader.load(item)[0]
        except BadEntry as exc:
            sample = Skip(BAD, str(exc))
        yield {"line": item.label["line"]}, sample, None, item.size, item.identity


def _dataset_prompts(directory):
    """(label, sample or Skip, at, size, identity) per sample of the dataset, in shard order."""
    for entry in shards.read_index(directory)["shards"]:
        for key, members in shards.iter_tar_samples(os.path.join(directory, entry["name"])):
            try:
                sample = json.loads(members["json"].decode("utf-8"))
            except (KeyError, UnicodeDecodeError, ValueError) as exc:
                sample = Skip(BAD, f"no readable .json member: {exc!r}")
            size = sum(len(v) + 512 for v in members.values())
            yield {"shard": entry["name"], "key": key}, sample, (entry["name"], key), size, entry["sha256"] + key


class PairSource:
    """The pairs as a `build` source: media values resolve against IN (manifest paths or sample members)."""

    def __init__(self, path, items):
        self.path, self.name = os.path.abspath(path), os.path.basename(os.path.normpath(path))
        self.manifest = None if os.path.isdir(self.path) else ManifestSource(self.path)
        self._items, self._cache = items, (None, {})

    def __getstate__(self):  # worker processes get their items with each task
        return {**self.__dict__, "_items": None, "_cache": (None, {})}

    def describe(self):
        return {"preference_pairs": self.name}

    def items(self):
        return self._items

    def load(self, item):
        at = item.payload["at"]
        if self.manifest:
            return item.payload["entry"], self.manifest.read_media  # build_sample copies the entry
        return item.payload["entry"], lambda value: self._member(at, value)

    def _member(self, at, value):
        shard, key = at
        if self._cache[0] != shard:  # pairs come in input order: each input shard is read about once
            self._cache = (shard, dict(shards.iter_tar_samples(os.path.join(self.path, shard))))
        members = self._cache[1].get(key, {})
        if value not in members:
            raise BadEntry(f"{value!r} is not a member of {key} in {shard} (omni-data build does not carry "
                           f"media of `candidates`: give its manifest as IN)")
        return members[value]

    def meta(self, item):
        return {"source": self.name, **item.payload["label"]}


def preference_pairs(in_path, out_dir, options, build_options):
    """Read IN, choose pairs, build them into out_dir; returns a PairsRun (its report also in out_dir)."""
    run, items = PairsRun(), []
    prompts = _dataset_prompts(in_path) if os.path.isdir(in_path) else _manifest_prompts(in_path)
    with _progress(build_options.progress) as bar:
        for label, sample, at, size, identity in prompts:
            run.prompts += 1
            bar.update(1)
            try:
                if isinstance(sample, Skip):
                    raise sample
                entries = prompt_pairs(sample, options)
            except Skip as skip:
                run.skipped[skip.args[0]] += 1
                run.report.append({**label, "reason": skip.args[0], "detail": skip.args[1]})
                continue
            run.paired += 1
            for entry in entries:
                body = json.dumps(entry, sort_keys=True, ensure_ascii=False).encode("utf-8")
                digest = hashlib.sha256(identity.encode() + b"\0" + body).hexdigest()
                payload = {"entry": entry, "at": at, "label": label}
                items.append(Item(len(items), label, payload, digest, size + len(body)))
    result = build(PairSource(in_path, items), out_dir, build_options)
    for error in result.errors:
        where = {k: error[k] for k in ("line", "shard", "key") if k in error}
        run.report.append({**where, "reason": BAD_PAIR, "detail": error["reason"]})
    run.pairs, run.index = result.index["num_samples"], result.index
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in run.report)
    shards.write_atomic(os.path.join(out_dir, REPORT_NAME), lines.encode("utf-8"))
    return run


def format_where(entry):
    return f"line {entry['line']}" if "line" in entry else f"{entry['shard']}: {entry['key']}"


def format_summary(run, out_dir):
    skipped = ", ".join(f"{reason} {run.skipped[reason]}" for reason in SKIP_REASONS)
    failed = sum(r["reason"] == BAD_PAIR for r in run.report)
    return (f"preference-pairs: {run.prompts} prompts read, {run.pairs} pairs written from {run.paired} prompts; "
            f"{sum(run.skipped.values())} prompts skipped ({skipped}); {failed} pairs failed to build "
            f"(see {os.path.join(out_dir, REPORT_NAME)})")


def _progress(enabled):
    from tqdm import tqdm

    return tqdm(unit="prompt", file=sys.stderr, desc="read prompts", disable=not enabled or None,
                dynamic_ncols=True)
