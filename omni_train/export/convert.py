"""omni-convert: HF Qwen3-Omni (or Qwen3-MoE) checkpoints <-> our megatron dist checkpoints.

    omni-convert import HF_DIR OUT_CKPT [--tp N --pp N --ep N] [--from-qwen3-moe]   (torchrun for N > 1)
    omni-convert export CKPT OUT_HF_DIR [--max-shard-mb MB]
    omni-convert generate OUT_HF_DIR --prompt TEXT [--max-new-tokens N] [--image F] [--audio F] [--no-stop]
    omni-convert verify HF_DIR [--tp N --ep N] [--atol X]                          (torchrun for N > 1)

Import builds the Thinker LM for the layout (on "meta", then empty CPU storage: no random init), fills each
rank's shards from the HF tensors it needs, one HF tensor at a time, and writes a dist checkpoint:
``model`` (the GPTModel's sharded_state_dict, as CheckpointManager writes it), ``talker`` / ``code2wav``
(the audio output as our Talker's sharded state and Code2Wav's tensors: talker.py), ``carried`` (every other
HF tensor, keyed ``carried.<HF name>``, written by rank 0: the towers, and the audio output where our Talker
cannot take it), the ``omni_train.json`` marker and the HF config.json / generation_config.json. Export
reads the checkpoint's global tensors layer by layer through a world-size-1 sharded state dict, whatever
layout wrote them (dist_io.py), each part (LM, Talker, Code2Wav, carried) from the checkpoint or, where it
holds none, from the import it was trained from, and writes transformers' on-disk layout; a run trained
from scratch gets its HF config and tokenizer from its config.yaml (from_run.py). Generate loads an export
with transformers and decodes greedily (generate.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from omni_train.compat import quiet_library_warnings

quiet_library_warnings()  # before megatron is imported: `python -m omni_train.export.convert` (the pipeline)

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from omni_train.checkpoint.manager import MARKER, latest_checkpoint
from omni_train.config.schema import ParallelConfig
from omni_train.export import talker as audio_output
from omni_train.export.dist_io import (
    EXPERT as _EXPERT, check_against_metadata, checkpoint_sources, key_templates as _key_templates, read_layer,
    read_whole,
)
from omni_train.export.from_run import NO_TALKER_NOTE, read_run, write_hf_files
from omni_train.export.hf_io import HFReader, ShardedWriter
from omni_train.models.thinker.hf_sources import SOURCES, TEXT_ONLY, read_hf_config  # noqa: F401 (re-exported)
from omni_train.models.thinker.lm import build_thinker_lm
from omni_train.models.thinker.bridge import (
    TIED_OUTPUT, expand_table, hf_shapes, model_config_from_hf, rename_hf, tp_slice, to_hf, to_megatron,
)

CONFIG_FILES = ("config.json", "generation_config.json")
CARRIED = "carried."
# what a training checkpoint holds besides the model, not exported: optimizer state, a stage's frozen models
# (talker_dpo's reference Talker: frozen.reference.*)
TRAINING_STATE = ("optimizer.", "frozen.")

# Source layouts (the architecture config.json names, its text config): models/thinker/hf_sources.py
def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------------
# import


def check_hf_lm(reader: HFReader, cfg, source: str) -> Tuple[torch.dtype, set]:
    """Every LM tensor present with the shape the config implies, one dtype; returns (dtype, names)."""
    expected = ((rename_hf(name, source), want) for row, _, hf_names in expand_table(cfg)
                for name, want in zip(hf_names, hf_shapes(row, cfg)))
    dtype, names = reader.check(expected, "LM", "the config")
    return dtype, set(names)


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_name(local: str, model, experts_per_rank: int) -> str:
    """This rank's parameter name -> the unsharded (tp = pp = ep = 1) megatron name."""
    layer = _LAYER.match(local)
    if layer:
        number = model.decoder.layers[int(layer.group(1))].layer_number - 1  # global, 0-based
        local = _LAYER.sub(f"decoder.layers.{number}.", local)
    offset = parallel_state.get_expert_model_parallel_rank() * experts_per_rank
    return _EXPERT.sub(lambda m: f".local_experts.{int(m.group(1)) + offset}.", local)


def _per_expert_parameters(cfg):
    """The LM config with megatron's SequentialMLP experts: one parameter per expert and projection, named as
    the bridge table and the checkpoints name them (the grouped experts write the same checkpoint)."""
    return dataclasses.replace(cfg, experts_impl="sequential")


def build_empty_lm(cfg, parallel_cfg: ParallelConfig, dtype: torch.dtype):
    """The rank's LM with uninitialized CPU storage; returns (model, {name: (tp split?, partition dim)})."""
    model = build_thinker_lm(_per_expert_parameters(cfg), parallel_cfg, device="meta", params_dtype=dtype,
                             pre_process=parallel_state.is_pipeline_first_stage(),
                             post_process=parallel_state.is_pipeline_last_stage())
    splits = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0))
              for n, p in model.named_parameters()}  # to_empty makes new Parameters without these
    return model.to_empty(device="cpu"), splits


def fill_lm(model, splits, reader: HFReader, cfg, source: str) -> None:
    """Copy every local parameter's piece from the HF tensors, reading only the tensors it needs."""
    table = {mg: (row, hf) for row, mg, hf in expand_table(cfg)}
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    experts_per_rank = cfg.num_experts // parallel_state.get_expert_model_parallel_world_size()
    with torch.no_grad():
        for name, param in model.named_parameters():
            unsharded = global_name(name, model, experts_per_rank)
            if cfg.tie_word_embeddings and unsharded == TIED_OUTPUT[0]:  # last stage's copy (pp > 1)
                unsharded = TIED_OUTPUT[1]
            if unsharded not in table:
                raise ValueError(f"megatron parameter {unsharded!r} has no row in the bridge table")
            row, hf_names = table[unsharded]
            full = to_megatron(row, [reader.get(rename_hf(n, source)) for n in hf_names], cfg)
            split, dim = splits[name]
            piece = tp_slice(row, full, dim, tp_rank, tp_size) if split else full
            if piece.shape != param.shape:
                raise ValueError(f"{unsharded!r} from {hf_names}: piece {list(piece.shape)} "
                                 f"!= parameter {list(param.shape)}")
            param.copy_(piece)


def carried_state(reader: HFReader, names: List[str]) -> Dict[str, ShardedTensor]:
    """Replicated non-LM tensors, keyed by HF name; only rank 0 contributes (and reads) them."""
    if _rank() != 0:
        return {}
    return {n: ShardedTensor.from_rank_offsets(CARRIED + n, reader.get(n), replica_id=0) for n in names}


def import_hf(hf_dir: Path, out: Path, parallel_cfg: ParallelConfig, source: str = "qwen3_omni_moe") -> Path:
    """HF checkpoint dir -> our dist checkpoint at ``out``; megatron's parallel state must match the layout."""
    hf_dir, out = Path(hf_dir), Path(out)
    config, text = read_hf_config(hf_dir, source)
    cfg = model_config_from_hf(text)
    reader = HFReader(hf_dir)
    dtype, lm_names = check_hf_lm(reader, cfg, source)
    audio = audio_output.plan_audio_output(config, reader, parallel_cfg) if source == "qwen3_omni_moe" \
        else audio_output.AudioOutput()
    carried = [n for n in reader.names() if n not in lm_names and n not in audio.names]
    if source in TEXT_ONLY and carried:
        raise ValueError(f"tensor {carried[0]!r} is not part of the {SOURCES[source][0]} LM ({len(carried)} unexpected)")
    if audio.carried_reason and _rank() == 0:
        print(f"omni-convert import: talker and code2wav carried unchanged (no Talker to train in this "
              f"checkpoint): {audio.carried_reason}", file=sys.stderr, flush=True)
    model, splits = build_empty_lm(cfg, parallel_cfg, dtype)
    fill_lm(model, splits, reader, cfg, source)
    tmp = out.with_name(out.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state = {"model": model.sharded_state_dict(), **audio_output.import_state(audio, reader, parallel_cfg)}
    if _rank() == 0 and carried:
        state["carried"] = carried_state(reader, carried)
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if _rank() == 0:
        for name in CONFIG_FILES:
            if (hf_dir / name).exists():
                shutil.copy(hf_dir / name, tmp / name)
        marker = dict(step=0, consumed_samples=0, hf_source=source, carried_from=str(out.resolve()),
                      layout=vars(parallel_cfg))
        if audio.marker():
            marker["audio_output"] = audio.marker()
        (tmp / MARKER).write_text(json.dumps(marker))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    _barrier()
    return out


# ---------------------------------------------------------------------------------------------------
# export


def key_templates(cfg, dtype: torch.dtype) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """Checkpoint key -> (unsharded megatron name template, global shape), from a world-size-1 meta LM.

    Layer keys carry a leading layer axis, expert keys then an expert axis (megatron's prepended axes).
    """
    model = build_thinker_lm(_per_expert_parameters(cfg), ParallelConfig(), device="meta", params_dtype=dtype)
    return _key_templates(model.sharded_state_dict(), dict(model.named_parameters()), cfg.num_layers,
                          cfg.num_experts)


def resolve_checkpoint(path: Path) -> Path:
    path = Path(path)
    if (path / MARKER).exists():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no {MARKER} (not a complete checkpoint or checkpoint root)")
    return found


def export_hf(ckpt: Path, out: Path, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Our checkpoint (any layout) -> transformers' on-disk layout; needs world-size-1 parallel state.

    An imported checkpoint (or one trained from an import) takes its HF config from the import; each part
    (Thinker LM, Talker, Code2Wav, carried tensors) comes from the checkpoint where it holds one, else from
    the import it was trained from. A run trained from scratch has no HF provenance: its HF config and
    tokenizer come from the run's config.yaml (export/from_run.py) and only what it trained is exported: the
    Thinker (LM and towers), and for a Talker stage's run its Talker and Code2Wav too.
    """
    ckpt, out = resolve_checkpoint(ckpt), Path(out)
    source = json.loads((ckpt / MARKER).read_text()).get("hf_source")
    run, hf_config = None, None
    if source is None:
        run = read_run(ckpt)  # before writing anything: a missing piece fails first
        cfg, source = run.model, "qwen3_omni_moe"
        hf_config = run.hf_config.to_dict() if run.talker is not None else None
    elif source not in SOURCES:
        raise ValueError(f"{ckpt / MARKER}: field 'hf_source' is {source!r}, expected one of {sorted(SOURCES)}")
    else:
        hf_config, text = read_hf_config(ckpt, source)
        cfg = model_config_from_hf(text)
    dtype = _write_weights(ckpt, out, cfg, source, max_shard_bytes, hf_config)
    if run is None:
        for name in CONFIG_FILES:
            if (ckpt / name).exists():
                shutil.copy(ckpt / name, out / name)
        if (out / "config.json").exists():  # a voice speaker_finetune added after the import
            audio_output.add_voices(out / "config.json", audio_output.checkpoint_voices(ckpt))
    else:
        write_hf_files(run, out, dtype)
        if run.talker is None:
            print(f"omni-convert export: {NO_TALKER_NOTE}", flush=True)
    return out


LM_ANCHOR = "embedding.word_embeddings.weight"


def _write_weights(ckpt: Path, out: Path, cfg, source: str, max_shard_bytes: int,
                   hf_config: Optional[dict]) -> torch.dtype:
    """The LM (through the bridge table), the Talker and Code2Wav (talker.py) and the carried tensors into
    sharded safetensors; returns the LM's dtype."""
    sources = checkpoint_sources(ckpt)
    lm = next(((path, metadata) for path, metadata in sources if LM_ANCHOR in metadata), None)
    if lm is None:
        raise ValueError(f"{ckpt}: checkpoint is missing tensor {LM_ANCHOR!r}")
    writer = ShardedWriter(out, max_shard_bytes)
    used = {path: set() for path, _ in sources}
    used[lm[0]] |= _write_lm(*lm, cfg, source, writer)
    for path, keys in audio_output.write_audio_output(sources, hf_config, writer, max_shard_bytes).items():
        used[path] |= keys
    for index, (path, metadata) in enumerate(sources):
        # the checkpoint's own keys must all be known; from the import take only what is still missing
        keys = [k for k in metadata if k not in used[path] and not k.startswith(TRAINING_STATE)]
        _export_carried(path, metadata, keys, writer.names(), writer, max_shard_bytes, strict=index == 0)
    writer.close()
    return lm[1][LM_ANCHOR].dtype


def _write_lm(path: Path, metadata: dict, cfg, source: str, writer: ShardedWriter) -> set:
    keys = key_templates(cfg, metadata[LM_ANCHOR].dtype)
    check_against_metadata(keys, metadata)
    table = {mg: (row, hf) for row, mg, hf in expand_table(cfg)}
    for layer in [None] + list(range(cfg.num_layers)):
        for name, tensor in read_layer(path, keys, metadata, layer).items():
            row, hf_names = table[name]
            for hf_name, piece in zip(hf_names, to_hf(row, tensor, cfg)):
                writer.add(rename_hf(hf_name, source), piece)
    return set(keys)


def _export_carried(path: Path, metadata: dict, keys: List[str], written: set, writer: ShardedWriter,
                    budget: int, strict: bool) -> None:
    """The carried tensors among ``keys`` whose HF name is not written yet, loaded in batches of at most
    ``budget`` bytes; with ``strict`` any key that is not carried is an error."""
    carried = []
    for key in keys:
        if not key.startswith(CARRIED):
            if strict:
                raise ValueError(f"checkpoint tensor {key!r} is neither an LM, Talker or Code2Wav tensor of this "
                                 "config nor carried")
            continue
        if key[len(CARRIED):] not in written:  # what the checkpoint wrote itself (e.g. a trained Talker) wins
            carried.append(key)
    for batch in audio_output.batches(metadata, carried, budget):
        for key, tensor in read_whole(path, metadata, batch).items():
            writer.add(key[len(CARRIED):], tensor)


# ---------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni-convert", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF checkpoint dir -> our dist checkpoint (torchrun for N > 1)")
    imp.add_argument("hf_dir", type=Path)
    imp.add_argument("out_ckpt", type=Path)
    for flag in ("--tp", "--pp", "--ep"):
        imp.add_argument(flag, type=int, default=1)
    imp.add_argument("--from-qwen3-moe", action="store_true",
                     help="the HF dir holds a Qwen3MoeForCausalLM; import it into the Thinker LM alone")
    exp = sub.add_parser("export", help="our checkpoint (any layout) -> transformers' on-disk layout")
    exp.add_argument("ckpt", type=Path, help="a checkpoint dir, or a checkpoint root with 'latest'")
    exp.add_argument("out_hf_dir", type=Path)
    exp.add_argument("--max-shard-mb", type=int, default=2048)
    gen = sub.add_parser("generate", help="greedy text from an export, loaded with transformers")
    gen.add_argument("hf_dir", type=Path)
    gen.add_argument("--prompt", required=True, help="the user turn's text")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--image", type=Path, help="an image file shown before the prompt")
    gen.add_argument("--audio", type=Path, help="an audio file played before the prompt")
    gen.add_argument("--no-stop", action="store_true", help="do not stop at <|im_end|>")
    ver = sub.add_parser("verify", help="import in memory, compare logits with transformers' (verify.py)")
    ver.add_argument("hf_dir", type=Path)
    for flag in ("--tp", "--ep"):
        ver.add_argument(flag, type=int, default=1)
    ver.add_argument("--atol", type=float, default=1e-4, help="largest max |logit difference| (fp32)")
    ver.set_defaults(pp=1)  # the towers and the comparison need the whole model on every pipeline rank
    return parser


def _generate(args) -> None:
    from omni_train.export.generate import generate_text

    try:
        text = generate_text(args.hf_dir, args.prompt, args.max_new_tokens, args.image, args.audio,
                             stop_at_eos=not args.no_stop)
    except FileNotFoundError as error:
        raise SystemExit(f"omni-convert generate: {error}") from None
    print(text, flush=True)


def main(argv=None) -> None:
    quiet_library_warnings()
    from omni_train.parallel.setup import init_parallel, shutdown_parallel

    args = _parser().parse_args(argv)
    if args.command == "generate":  # transformers alone: no process group
        return _generate(args)
    layout = ParallelConfig(backend="gloo")
    if args.command in ("import", "verify"):
        layout = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, backend="gloo",
                                sequence_parallel=args.tp > 1)  # megatron: MoE + TP needs SP
    init_parallel(layout, torch.device("cpu"), seed=0)
    try:
        if args.command == "verify":
            from omni_train.export.verify import run_cli

            return run_cli(args, layout)
        if args.command == "import":
            source = "qwen3_moe" if args.from_qwen3_moe else "qwen3_omni_moe"
            out = import_hf(args.hf_dir, args.out_ckpt, layout, source)
        else:
            if dist.get_world_size() != 1:
                raise SystemExit("omni-convert export runs as a single process")
            try:
                out = export_hf(args.ckpt, args.out_hf_dir, args.max_shard_mb * 1024**2)
            except (ValueError, FileNotFoundError) as error:  # what is missing or unsupported: one line
                raise SystemExit(f"omni-convert export: {error}") from None
        if _rank() == 0:
            print(f"omni-convert {args.command}: wrote {out}")
    finally:
        shutdown_parallel()


if __name__ == "__main__":
    main()
