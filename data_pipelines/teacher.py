"""`omni-data teacher-responses`: add a teacher model's answers to the `teacher` field of a dataset.

IN_DIR -> OUT_DIR shard by shard: the same keys, members (media bytes unchanged) and shard layout; each
sample's `teacher` list gets one more entry, `{"model", "mode", "messages": [one assistant turn],
"finish_reason"}`, plus three `.npy` members named by its `logprobs` with top-k log-probabilities. The
entry answers the last user message (docs/data_format.md, the alignment rule). A sample the teacher
cannot answer (no user turn, a media prompt for a text-only teacher, a request that kept failing) is
copied unchanged, reported in `teacher_report.jsonl` and counted; that is never fatal.

Resumable (shard_rewrite.py): an output shard is written to a temp file and renamed, after its record in
`OUT_DIR/.teacher/` (answered and failed keys, a fingerprint of the input shard's bytes and of the
generation settings, the output's sha256). A rerun keeps a shard whose record and file match, asks again
only for its failed samples (reading the earlier output, so earlier answers stay), and redoes the others.
The unit of work lost to an interruption is one shard. index.json is removed when a run starts and
written last. A shard's prompts are held in memory while it is generated (with media, as base64 for an
endpoint).
"""

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

from data_pipelines import media, schema, shards
from data_pipelines.shard_rewrite import ShardRewrite, progress
from data_pipelines.teacher_prompts import Answer, SampleFailed

RECORDS_DIR = ".teacher"
REPORT_NAME = "teacher_report.jsonl"
FORMAT = "teacher-entry-1"  # in the fingerprint: bump when what a sample gets changes


@dataclass
class TeacherRun:
    index: dict
    failures: list  # report lines: {"key", "shard", "reason"}
    answered: int  # samples of OUT_DIR with this run's entry (now or in an earlier, resumed run)
    written: list  # shard names written by this run


@dataclass
class ShardJob:
    name: str
    source: str  # the tar read: the input shard, or the earlier output when only failures are retried
    ask: Optional[set]  # keys to ask the teacher for; None: every sample; empty: the shard is done
    record: dict  # what goes to .teacher/<name>.json (earlier answers kept when retrying)


def teacher_responses(in_dir, out_dir, teacher, name, options, show_progress=True):
    """Write OUT_DIR (or finish writing it). teacher: LocalTeacher or EndpointTeacher. Returns a TeacherRun."""
    settings = {"format": FORMAT, "teacher": teacher.identity, "name": name, **asdict(options)}
    rewrite = ShardRewrite(in_dir, out_dir, RECORDS_DIR, settings)
    entries = rewrite.index["shards"]
    jobs = [_plan(rewrite, entry["name"]) for entry in entries]
    todo = sum(e.get("num_samples", 0) if j.ask is None else len(j.ask) for j, e in zip(jobs, entries))
    records, written = [], []
    with progress(todo, show_progress, "teacher") as bar:
        for job in jobs:
            if job.ask == set():
                records.append(job.record)
                continue
            records.append(_run_shard(rewrite, job, teacher, name, options, bar))
            written.append(job.name)
    index, failures = rewrite.finish(records, REPORT_NAME)
    return TeacherRun(index, failures, sum(len(r["answered"]) for r in records), written)


def _plan(rewrite, name):
    """What to do with one shard: nothing, ask again for its failed samples, or ask for every sample."""
    fingerprint = rewrite.fingerprint(name)
    record = rewrite.finished_record(name, fingerprint)
    if record:
        return ShardJob(name, os.path.join(rewrite.out_dir, name), set(record["failed"]), record)
    fresh = {"fingerprint": fingerprint, "answered": [], "failed": {}}
    return ShardJob(name, os.path.join(rewrite.in_dir, name), None, fresh)


def _run_shard(rewrite, job, teacher, name, options, bar):
    prompts, failed = _prompts(job, teacher, options)
    bar.update(len(failed))
    answers = teacher.answer(prompts, on_done=bar.update)
    failed.update({key: str(a) for key, a in answers.items() if isinstance(a, SampleFailed)})
    answers = {key: a for key, a in answers.items() if isinstance(a, Answer)}
    record = {**job.record, "answered": sorted(set(job.record["answered"]) | set(answers)),
              "failed": dict(sorted(failed.items())), "num_samples": 0}
    return rewrite.write(job.name, _members(job.source, answers, name, options.mode, record), record)


def _prompts(job, teacher, options):
    """Pass 1 over the source tar: [(key, prompt)] to ask and {key: reason} of samples that cannot be."""
    prompts, failed = [], {}
    for key, members in shards.iter_tar_samples(job.source):
        if job.ask is not None and key not in job.ask:
            continue
        try:
            sample = _sample(key, members, options)
            prompts.append((key, teacher.prepare(sample["messages"], members)))
        except SampleFailed as exc:
            failed[key] = str(exc)
    return prompts, failed


def _sample(key, members, options):
    """The sample's JSON, if a teacher entry can be added to it (SampleFailed otherwise)."""
    try:
        sample = json.loads(members["json"].decode("utf-8"))
    except (KeyError, UnicodeDecodeError, ValueError) as exc:
        raise SampleFailed(f"no readable JSON member {key}.json ({type(exc).__name__})") from None
    errors = schema.check_sample(sample, members=set(members))
    if errors:
        raise SampleFailed(f"invalid sample: {errors[0]}")
    taken = [n for n in _logprobs_names(len(sample.get("teacher") or [])).values() if n in members]
    if options.top_logprobs and taken:
        raise SampleFailed(f"member {key}.{taken[0]} exists already")
    return sample


def _logprobs_names(j):
    return {field: f"teacher{j}_{field}.npy" for field in schema.LOGPROBS_FIELDS}


def _members(source, answers, name, mode, record):
    """Pass 2: every sample of the source tar, with its new teacher entry when it has an answer."""
    for key, members in shards.iter_tar_samples(source):
        record["num_samples"] += 1
        if key in answers:
            members = _with_answer(members, answers[key], name, mode)
        yield from ((f"{key}.{suffix}", data) for suffix, data in members.items())


def _with_answer(members, answer, name, mode):
    sample = json.loads(members["json"].decode("utf-8"))
    teacher = sample.setdefault("teacher", [])
    entry = {"model": name, "mode": mode, "messages": [{"role": "assistant", "content": answer.text}],
             "finish_reason": answer.finish_reason}
    arrays = {}
    if answer.top_ids is not None:
        entry["logprobs"] = _logprobs_names(len(teacher))
        arrays = {entry["logprobs"]["tokens"]: answer.tokens, entry["logprobs"]["top_ids"]: answer.top_ids,
                  entry["logprobs"]["top_logprobs"]: answer.top_logprobs}
    teacher.append(entry)
    body = json.dumps(sample, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return {"json": body, **{s: d for s, d in members.items() if s != "json"},
            **{s: media.npy_bytes(a) for s, a in arrays.items()}}
