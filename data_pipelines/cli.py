"""omni-data: build, validate, inspect and synthesize omni-train shard datasets (docs/data_format.md).

  omni-data build MANIFEST.jsonl OUT_DIR [--workers 4] [--samples-per-shard 1000] [--shard-size-mb 512]
  omni-data build --dataset DATA_DIR OUT_DIR --column audio=audio --column text=transcription \\
      --prompt "Transcribe the audio."
  omni-data validate DIR
  omni-data stats DIR [--recount] [--json]
  omni-data synth OUT_DIR [--samples 12] [--seed 0] [--corrupt BAD_DIR]
"""

import argparse
import json
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

    p = commands.add_parser("synth-suite", help="one synthetic dataset per pretraining data kind + a tokenizer")
    p.add_argument("root")
    p.add_argument("kinds", nargs="*", metavar="KIND[=N]",
                   help="text, audio_text, image_text, video_text, video_audio, long_audio, long_video "
                        "(default: all), each with N samples")
    p.add_argument("--samples", type=int, default=16, help="samples per kind without =N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    return parser


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


def main(argv=None):
    quiet_library_warnings()
    args = make_parser().parse_args(argv)
    try:
        return {"build": run_build, "validate": run_validate, "stats": run_stats, "synth": run_synth,
                "synth-suite": run_synth_suite}[
            args.command](args)
    except (OSError, ValueError) as exc:
        print(f"omni-data {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
