"""omni-data: build, validate, inspect and synthesize omni-train shard datasets (docs/data_format.md).

  omni-data build MANIFEST.jsonl OUT_DIR [--workers 4] [--samples-per-shard 1000] [--shard-size-mb 512]
  omni-data build --dataset DATA_DIR OUT_DIR --column audio=audio --column text=transcription \\
      --prompt "Transcribe the audio."
  omni-data validate DIR
  omni-data stats DIR [--recount] [--json]
  omni-data synth OUT_DIR [--samples 12] [--seed 0] [--corrupt BAD_DIR]
  omni-data teacher-responses IN_DIR OUT_DIR (--model HF_DIR | --url http://host:port/v1 [--served-model NAME]
      [--api-key-env VAR] [--tokenizer DIR]) [--name NAME] [--mode think|no_think] [--max-new-tokens 512]
      [--temperature 0] [--top-p 1.0] [--seed 0] [--batch-size 8] [--top-logprobs K] [--timeout 60]
      [--retries 2] [--workers 4] [--no-progress] [--strict]
  omni-data codec DATASET OUT_DIR --codec-model MIMI_DIR [--device cpu|cuda] [--batch-size 8] [--strict]
  omni-data synth-suite ROOT [KIND[=N] ...]
  omni-data preference-pairs IN OUT_DIR --score KEY[:WEIGHT] [--score ...] [--lower-is-better]
      [--rule best-worst|all-pairs|best-vs-rest] [--min-margin 0] [--max-pairs-per-prompt N] [--strict]
"""

import argparse
import json
import os
import sys

from data_pipelines.build import BuildOptions, format_error
from omni_train.compat import quiet_library_warnings


def _add_build_options(parser, samples_per_shard):
    parser.add_argument("--samples-per-shard", type=int, default=samples_per_shard, help="most samples per shard")
    parser.add_argument("--shard-size-mb", type=float, default=512.0, help="target largest shard size (MiB)")
    parser.add_argument("--workers", type=int, default=1, help="processes that write shards")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _options(args):
    return BuildOptions(args.samples_per_shard, args.shard_size_mb, args.workers, not args.no_progress)


def make_parser():
    parser = argparse.ArgumentParser(prog="omni-data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("build", help="build shards from a manifest or a local datasets dataset")
    p.add_argument("inputs", nargs="+", metavar="PATH",
                   help="MANIFEST.jsonl OUT_DIR, or only OUT_DIR with --dataset")
    p.add_argument("--dataset", help="load_from_disk dir, parquet file/dir, or audiofolder/imagefolder dir")
    p.add_argument("--dataset-format", default="auto", choices=["auto", "disk", "parquet", "folder"])
    p.add_argument("--split", default="", help="split of a saved DatasetDict (default: train)")
    p.add_argument("--column", action="append", default=[], metavar="FIELD=COLUMN",
                   help="conversation field from a column: audio, image, video, text (answer), prompt, speaker")
    p.add_argument("--prompt", default="", help="user text added after the media of each row")
    p.add_argument("--system", default="", help="system message for each row")
    p.add_argument("--strict", action="store_true", help="exit 1 if any entry was bad")
    _add_build_options(p, 1000)

    p = commands.add_parser("validate", help="read and decode every sample; exit 1 on any problem")
    p.add_argument("directory")

    p = commands.add_parser("stats", help="samples, hours of audio, images, video minutes, tokens")
    p.add_argument("directory")
    p.add_argument("--recount", action="store_true", help="recompute by reading the shards")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = commands.add_parser("synth", help="write a small synthetic dataset of real media")
    p.add_argument("out_dir")
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corrupt", metavar="BAD_DIR", help="also write a damaged copy here (test fixtures)")
    p.add_argument("--source-dir", help="keep the generated media + manifest.jsonl + truth.json here")
    p.add_argument("--tokenizer", metavar="TOK_DIR",
                   help="also write a small BPE tokenizer with Qwen's special tokens, trained on the texts")
    _add_build_options(p, 4)

    p = commands.add_parser("synth-suite", help="one synthetic dataset per data kind (pretraining and post-training) + a tokenizer")
    p.add_argument("root")
    p.add_argument("kinds", nargs="*", metavar="KIND[=N]",
                   help="text, audio_text, image_text, video_text, video_audio, long_audio, long_video, sft, distill, caption "
                        "(default: all), each with N samples")
    p.add_argument("--samples", type=int, default=16, help="samples per kind without =N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    _add_teacher_parser(commands)
    _add_codec_parser(commands)
    _add_preference_parser(commands)
    return parser


def _add_teacher_parser(commands):
    p = commands.add_parser("teacher-responses", help="add a teacher model's answers to the `teacher` field")
    p.add_argument("in_dir")
    p.add_argument("out_dir")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", metavar="HF_DIR", help="a local AutoModelForCausalLM directory (text prompts)")
    where.add_argument("--url", help="an OpenAI-compatible endpoint, e.g. http://host:8000/v1 (vllm serve)")
    p.add_argument("--served-model", help="the endpoint's model name (default: its first in /models)")
    p.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the endpoint's API key")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="maps an endpoint's token strings to ids (when it lacks return_tokens_as_token_ids)")
    p.add_argument("--name", help="the entry's `model` (default: the model directory's or served model's name)")
    p.add_argument("--mode", default="think", choices=["think", "no_think"], help="the template's enable_thinking")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (local model)")
    p.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                   help="also store the top-K log-probabilities of every generated token")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (endpoint)")
    p.add_argument("--retries", type=int, default=2, help="retries of a failed request (endpoint)")
    p.add_argument("--backoff", type=float, default=1.0, help="seconds before the first retry, doubled after")
    p.add_argument("--workers", type=int, default=4, help="concurrent requests (endpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--strict", action="store_true", help="exit 1 if any sample got no response")


def run_build(args):
    from data_pipelines.build import build
    from data_pipelines.sources import ManifestSource, TableSource

    if args.dataset:
        if len(args.inputs) != 1:
            raise SystemExit("omni-data build --dataset DATA_DIR OUT_DIR: give only OUT_DIR as a positional")
        columns = dict(_split_column(c) for c in args.column)
        source = TableSource(args.dataset, columns, args.prompt, args.system, args.dataset_format, args.split)
    else:
        if len(args.inputs) != 2:
            raise SystemExit("omni-data build MANIFEST.jsonl OUT_DIR")
        source = ManifestSource(args.inputs[0])
    result = build(source, args.inputs[-1], _options(args))
    for error in result.errors:
        print(f"bad entry: {format_error(error)}", file=sys.stderr)
    index = result.index
    print(f"built {len(result.built)} shards, kept {len(result.skipped)}; {index['num_samples']} samples, "
          f"{len(result.errors)} bad entries -> {args.inputs[-1]}", file=sys.stderr)
    return 1 if args.strict and result.errors else 0


def _split_column(text):
    field, sep, column = text.partition("=")
    if not sep or not field or not column:
        raise SystemExit(f"--column takes FIELD=COLUMN, got {text!r}")
    return field, column


def run_validate(args):
    from data_pipelines.validate import scan_dataset

    scan = scan_dataset(args.directory)
    for problem in scan.problems:
        print(f"BAD {problem}")
    if scan.problems:
        print(f"{len(scan.problems)} problems in {args.directory}", file=sys.stderr)
        return 1
    print(f"OK {scan.num_samples} samples in {scan.num_shards} shards")
    return 0


def run_stats(args):
    from data_pipelines.stats import dataset_stats, format_stats

    stats = dataset_stats(args.directory, recount=args.recount)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
    return 0


def run_synth(args):
    from data_pipelines.corrupt import make_corrupt_copy
    from data_pipelines.synth import synth

    truth, result = synth(args.out_dir, args.samples, args.seed, args.source_dir, _options(args))
    if args.tokenizer:
        from omni_train.data.chat import build_test_tokenizer

        build_test_tokenizer(args.tokenizer, extra_texts=[json.dumps(e) for e in truth["entries"]])
    print(f"synth: {result.index['num_samples']} samples in {len(result.index['shards'])} shards -> "
          f"{args.out_dir}", file=sys.stderr)
    if args.corrupt:
        corruptions = make_corrupt_copy(args.out_dir, args.corrupt)
        print(json.dumps(corruptions, indent=2))
    return 1 if result.errors else 0


def run_synth_suite(args):
    from data_pipelines.pretrain_synth import parse_samples, synth_suite

    built = synth_suite(args.root, parse_samples(args.kinds, args.samples), args.seed, args.workers)
    print(f"synth-suite: {', '.join(f'{k} {n}' for k, n in built.items())} samples -> {args.root} "
          f"(tokenizer: {args.root}/tokenizer)", file=sys.stderr)
    return 0


def run_teacher_responses(args):
    from data_pipelines.teacher import REPORT_NAME, teacher_responses
    from data_pipelines.teacher_prompts import GenerateOptions

    if args.max_new_tokens < 1 or args.top_logprobs < 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError("need --max-new-tokens >= 1, --top-logprobs >= 0, --temperature >= 0, 0 < --top-p <= 1")
    options = GenerateOptions(args.mode, args.max_new_tokens, args.temperature, args.top_p, args.seed,
                              args.top_logprobs)
    teacher = _make_teacher(args, options)
    name = args.name or (os.path.basename(os.path.normpath(args.model)) if args.model else teacher.served_model)
    run = teacher_responses(args.in_dir, args.out_dir, teacher, name, options, not args.no_progress)
    for failure in run.failures:
        print(f"no response: {failure['shard']}: {failure['key']}: {failure['reason']}", file=sys.stderr)
    print(f"teacher-responses: {run.index['num_samples']} samples, {run.answered} answered, "
          f"{len(run.failures)} failed (see {os.path.join(args.out_dir, REPORT_NAME)})", file=sys.stderr)
    return 1 if args.strict and run.failures else 0


def _make_teacher(args, options):
    if args.model:
        from data_pipelines.teacher_local import LocalTeacher

        return LocalTeacher(args.model, options, args.batch_size)
    from data_pipelines.teacher_endpoint import EndpointTeacher

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: the environment variable {args.api_key_env} is not set")
    return EndpointTeacher(args.url, options, args.served_model, api_key, args.workers, args.timeout,
                           args.retries, args.backoff, args.tokenizer)


def _add_codec_parser(commands):
    p = commands.add_parser("codec", help="add Talker codec targets to assistant speech (a local MimiModel)")
    p.add_argument("in_dir", metavar="DATASET")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--codec-model", required=True, metavar="DIR",
                   help="a local transformers MimiModel directory, e.g. kyutai/mimi (docs/codec.md)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch-size", type=int, default=8, help="audios per encoder call")
    p.add_argument("--max-seconds", type=float, default=60.0, help="longer speech is reported, not encoded")
    p.add_argument("--overwrite", action="store_true", help="re-encode audio parts that already have a codec")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--strict", action="store_true", help="exit 1 if any sample got no codec")


def run_codec(args):
    from data_pipelines.codec import REPORT_NAME, CodecOptions, codec_targets
    from data_pipelines.codec_model import TALKER_CODEBOOKS, MimiCodec

    if args.batch_size < 1 or not args.max_seconds > 0:
        raise ValueError("need --batch-size >= 1 and --max-seconds > 0")
    codec = MimiCodec(args.codec_model, args.device, args.batch_size)
    c = codec.config
    print(f"codec model: {c.num_quantizers} codebooks (the first {TALKER_CODEBOOKS} used) of {c.codebook_size} "
          f"codes, {c.sampling_rate} Hz, {c.frame_rate:g} frames/s", file=sys.stderr)
    run = codec_targets(args.in_dir, args.out_dir, codec, CodecOptions(args.max_seconds, args.overwrite),
                        not args.no_progress)
    for failure in run.failures:
        print(f"no codec: {failure['shard']}: {failure['key']}: {failure['reason']}", file=sys.stderr)
    print(f"codec: {run.index['num_samples']} samples, {run.encoded} speech parts encoded, {run.kept} kept their "
          f"codec, {len(run.failures)} samples failed (see {os.path.join(args.out_dir, REPORT_NAME)}); "
          f"{len(run.written)} shards written, {len(run.skipped)} done earlier", file=sys.stderr)
    return 1 if args.strict and run.failures else 0


def _add_preference_parser(commands):
    p = commands.add_parser("preference-pairs", help="DPO pairs (chosen/rejected) from scored candidate responses")
    p.add_argument("in_path", metavar="IN", help="a dataset directory or a JSONL manifest with `candidates`")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--score", action="append", default=[], metavar="KEY[:WEIGHT]", required=True,
                   help="a candidate's score: the sum of WEIGHT (default 1) * scores[KEY]; higher is better")
    p.add_argument("--lower-is-better", action="store_true", help="negate the sum (WER-like scores)")
    p.add_argument("--rule", default="best-worst", choices=["best-worst", "all-pairs", "best-vs-rest"])
    p.add_argument("--min-margin", type=float, default=0.0, help="skip pairs whose score gap is smaller")
    p.add_argument("--max-pairs-per-prompt", type=int, default=0, metavar="N", help="0: no limit")
    p.add_argument("--strict", action="store_true", help="exit 1 if any prompt was bad or any pair failed")
    _add_build_options(p, 1000)


def run_preference_pairs(args):
    from data_pipelines.preference_pairs import (BAD, BAD_PAIR, MISSING, PairOptions, format_summary,
                                                 format_where, parse_score, preference_pairs)

    options = PairOptions([parse_score(s) for s in args.score], args.rule, args.min_margin,
                          args.max_pairs_per_prompt, args.lower_is_better)
    run = preference_pairs(args.in_path, args.out_dir, options, _options(args))
    bad = [r for r in run.report if r["reason"] in (BAD, MISSING, BAD_PAIR)]
    for r in bad:
        print(f"{r['reason']}: {format_where(r)}: {r['detail']}", file=sys.stderr)
    print(format_summary(run, args.out_dir), file=sys.stderr)
    return 1 if args.strict and bad else 0


def main(argv=None):
    quiet_library_warnings()
    args = make_parser().parse_args(argv)
    try:
        return {"build": run_build, "validate": run_validate, "stats": run_stats, "synth": run_synth,
                "synth-suite": run_synth_suite, "teacher-responses": run_teacher_responses,
                "codec": run_codec, "preference-pairs": run_preference_pairs}[
            args.command](args)
    except (OSError, ValueError) as exc:
        print(f"omni-data {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
