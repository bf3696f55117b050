"""The Talker (backbone, projections, code predictor) and Code2Wav in omni-convert: HF tensors into real
checkpoint keys and back, through the declarative tables of ``models/talker/weights.py``.

Checkpoint keys:
    talker.*     ``Talker.sharded_state_dict(prefix="talker.")``: the megatron backbone's keys (a leading layer
                 axis; routed experts then an expert axis, each written by the expert-parallel rank holding
                 it), the projections and the code predictor replicated (data-parallel rank 0 writes). A
                 checkpoint whose model is the Talker alone (``CheckpointManager`` saving a ``Talker``) holds
                 the same keys without ``talker.``; both are read.
    code2wav.*   the Code2Wav wrapper's state dict (``model.*``: transformers' module by its HF names), replicated.
    voice.*      a speaker_finetune checkpoint's voice (stages/speaker_finetune.py): ``voice.<name>.id`` (int64 [1])
                 and ``voice.<name>.row``, already written into the codec table's row at that id; export names
                 it in ``talker_config.speaker_id`` (``checkpoint_voices``) and writes nothing else of it.

Import builds this rank's Talker for the layout (per-expert parameters on "meta", then empty CPU storage),
fills it from the HF tensors it needs and saves its sharded state. Our Talker runs at tp = pp = cp = 1 and
any ep dividing its experts (``build_talker`` refuses the rest). At another layout, or for a talker config it
cannot represent, import carries the talker.* and code2wav.* tensors unchanged as ``carried.<HF name>`` (what
it did before the Talker existed), prints why and records it in the marker (``audio_output``): such a
checkpoint exports bit-identical but holds no Talker to train (``load_talker`` says so).

Export reads the Talker back layer by layer from the first checkpoint that holds it (the checkpoint, else
the import it was trained from: ``dist_io.checkpoint_sources``) and writes transformers' names.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from omni_train.checkpoint import safe_load
from omni_train.checkpoint.manager import MARKER
from omni_train.config.schema import ParallelConfig
from omni_train.export.dist_io import (
    EXPERT, check_against_metadata, checkpoint_sources, key_templates, read_layer, read_whole,
)
from omni_train.export.hf_io import HFReader, ShardedWriter
from omni_train.models.talker.config import TalkerConfig, check_talker_config
from omni_train.models.talker.hf_config import talker_config_from_hf
from omni_train.models.talker.model import Talker, build_talker
from omni_train.models.talker.weights import CODE2WAV_PREFIXES, expand_table, hf_shapes
from omni_train.models.thinker.bridge import to_hf, to_megatron

TALKER = "talker."  # checkpoint key prefix of the Talker
CODE2WAV = "code2wav."  # checkpoint key prefix of the Code2Wav wrapper's state dict
KEY_PREFIXES = (TALKER, "")  # where a checkpoint may hold the Talker: joint / imported, or a Talker-only model
ANCHOR = "backbone.embedding.word_embeddings.weight"  # a checkpoint holds a Talker iff it holds this
HF_PREFIXES = ("talker.", "code2wav.")  # the HF tensors of the audio output
VOICE = "voice."  # a fine-tuned voice's keys (stages/speaker_finetune.py)
VOICE_ID = re.compile(r"^voice\.([^.]+)\.id$")
LAYERS = "backbone.decoder.layers."
IMPORTED = "talker"  # the marker's ``audio_output`` when the Talker was imported as a model


@dataclass
class AudioOutput:
    """What import does with an HF directory's talker.* and code2wav.* tensors."""

    cfg: Optional[TalkerConfig] = None  # set: imported as our Talker (and Code2Wav as its keys)
    dtype: Optional[torch.dtype] = None  # the Talker's tensors' dtype
    talker_names: List[str] = field(default_factory=list)
    code2wav_names: List[str] = field(default_factory=list)
    carried_reason: Optional[str] = None  # set: carried unchanged, and why

    @property
    def names(self) -> set:
        """HF names taken as model tensors (the rest of talker.* / code2wav.* is carried)."""
        return set(self.talker_names) | set(self.code2wav_names)

    def marker(self) -> Optional[str]:
        if self.cfg is not None:
            return IMPORTED
        return f"carried: {self.carried_reason}" if self.carried_reason else None


def audio_output_config(config: dict) -> Optional[TalkerConfig]:
    """The TalkerConfig of a Qwen3-Omni ``config.json`` (None without audio output); ValueError naming what
    our Talker cannot represent."""
    if not config.get("enable_audio_output", True) or not config.get("talker_config"):
        return None
    try:
        cfg = talker_config_from_hf(config["talker_config"], config)
    except KeyError as missing:
        raise ValueError(f"config.json: talker field {missing} is missing") from None
    check_talker_config(cfg)
    return cfg


def _per_expert(cfg: TalkerConfig) -> TalkerConfig:
    """megatron's SequentialMLP experts: one parameter per expert and projection, as the table names them
    (the grouped experts training uses read and write the same checkpoint)."""
    return dataclasses.replace(cfg, experts_impl="sequential")


def layout_problem(cfg: TalkerConfig, layout: ParallelConfig) -> Optional[str]:
    """Why our Talker cannot be built for this layout and config (None: it can)."""
    if layout.tp > 1 or layout.pp > 1 or layout.cp > 1:
        return (f"our Talker runs at tp = pp = cp = 1 only (build_talker refuses tp={layout.tp} pp={layout.pp} "
                f"cp={layout.cp}); import with --tp 1 --pp 1 (any --ep) to train it")
    if cfg.num_experts % layout.ep:
        return f"the Talker's {cfg.num_experts} experts do not split over ep={layout.ep}"
    try:  # what megatron refuses for these sizes (e.g. top-1 routing with renormalised top-k)
        build_talker(_per_expert(cfg), dataclasses.replace(layout, sequence_parallel=False), device="meta",
                     params_dtype=torch.float32)
    except (ValueError, NotImplementedError) as error:
        return f"our Talker cannot be built for this talker config: {error}"
    return None


def check_hf_talker(reader: HFReader, cfg: TalkerConfig) -> Tuple[torch.dtype, List[str]]:
    """Every Talker tensor of the table present with the shape the config implies, one dtype; returns
    (dtype, names)."""
    expected = ((name, want) for row, _, hf_names in expand_table(cfg)
                for name, want in zip(hf_names, hf_shapes(row, cfg)))
    return reader.check(expected, "Talker", "the talker config")


def plan_audio_output(config: dict, reader: HFReader, layout: ParallelConfig) -> AudioOutput:
    """Import the audio output as our Talker + Code2Wav keys, or carry it (and why); raises for a broken
    directory (a Talker tensor missing or mis-shaped, one the table does not know, no Code2Wav)."""
    present = [n for n in reader.names() if n.startswith(HF_PREFIXES)]
    if not present:
        return AudioOutput()
    try:
        cfg = audio_output_config(config)
    except ValueError as error:
        return AudioOutput(carried_reason=str(error))
    if cfg is None:
        return AudioOutput(carried_reason="config.json has enable_audio_output=false or no talker_config")
    problem = layout_problem(cfg, layout)
    if problem:
        return AudioOutput(carried_reason=problem)
    dtype, talker_names = check_hf_talker(reader, cfg)
    known = set(talker_names)
    unknown = [n for n in present if n.startswith("talker.") and n not in known]
    if unknown:
        raise ValueError(f"tensor {unknown[0]!r} has no row in the Talker table ({len(unknown)} such tensors)")
    code2wav = [n for n in present if n.startswith("code2wav.")]
    if not code2wav:
        raise ValueError("config.json enables audio output but the HF checkpoint holds no code2wav.* tensor")
    return AudioOutput(cfg, dtype, talker_names, code2wav)


# ---------------------------------------------------------------------------------------------------
# import


def build_empty_talker(cfg: TalkerConfig, layout: ParallelConfig, dtype: torch.dtype) -> Talker:
    """This rank's Talker with per-expert parameters and uninitialized CPU storage (no random init; the
    non-persistent rotary buffers stay unset: fill, then save, never run it)."""
    layout = dataclasses.replace(layout, sequence_parallel=False)
    return build_talker(_per_expert(cfg), layout, device="meta", params_dtype=dtype).to_empty(device="cpu")


def _expert_offset(cfg: TalkerConfig) -> int:
    return parallel_state.get_expert_model_parallel_rank() * (
        cfg.num_experts // parallel_state.get_expert_model_parallel_world_size())


def global_talker_name(local: str, offset: int) -> str:
    """This rank's Talker parameter name -> the unsharded one (tp = pp = 1: only experts are renumbered)."""
    return EXPERT.sub(lambda m: f".local_experts.{int(m.group(1)) + offset}.", local)


def fill_talker(model: Talker, reader: HFReader, cfg: TalkerConfig) -> None:
    """Copy every local parameter (per-expert Talker) from the HF tensors it needs."""
    table = {ours: (row, hf) for row, ours, hf in expand_table(cfg)}
    offset = _expert_offset(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            unsharded = global_talker_name(name, offset)
            if unsharded not in table:
                raise ValueError(f"Talker parameter {unsharded!r} has no row in the Talker table")
            row, hf_names = table[unsharded]
            full = to_megatron(row, [reader.get(n) for n in hf_names], cfg)
            if full.shape != param.shape:
                raise ValueError(f"{unsharded!r} from {hf_names}: {list(full.shape)} != parameter {list(param.shape)}")
            param.copy_(full)


def code2wav_key(hf_name: str) -> str:
    hf, ours = CODE2WAV_PREFIXES
    return CODE2WAV + ours + hf_name[len(hf):]


def code2wav_hf_name(key: str) -> str:
    hf, ours = CODE2WAV_PREFIXES
    return hf + key[len(CODE2WAV + ours):]


def import_state(audio: AudioOutput, reader: HFReader, layout: ParallelConfig) -> Dict[str, dict]:
    """The checkpoint entries of an imported audio output: {"talker": this rank's sharded Talker,
    "code2wav": replicated tensors (rank 0)}; empty when carried."""
    if audio.cfg is None:
        return {}
    talker = build_empty_talker(audio.cfg, layout, audio.dtype)
    fill_talker(talker, reader, audio.cfg)
    state = {"talker": talker.sharded_state_dict(prefix=TALKER)}
    if (dist.get_rank() if dist.is_initialized() else 0) == 0:
        state["code2wav"] = {n: ShardedTensor.from_rank_offsets(code2wav_key(n), reader.get(n), replica_id=0)
                             for n in audio.code2wav_names}
    return state


# ---------------------------------------------------------------------------------------------------
# export


def find_talker(sources) -> Optional[Tuple[Path, dict, str]]:
    """(checkpoint, its metadata, key prefix) of the first source holding a Talker, or None."""
    for path, metadata in sources:
        for prefix in KEY_PREFIXES:
            if prefix + ANCHOR in metadata:
                return path, metadata, prefix
    return None


def find_code2wav(sources) -> Optional[Tuple[Path, dict, List[str]]]:
    for path, metadata in sources:
        keys = [k for k in metadata if k.startswith(CODE2WAV)]
        if keys:
            return path, metadata, keys
    return None


def talker_templates(cfg: TalkerConfig, prefix: str, dtype: torch.dtype):
    """Checkpoint key -> (unsharded Talker name template, global shape), from a world-size-1 meta Talker."""
    model = build_talker(_per_expert(cfg), ParallelConfig(), device="meta", params_dtype=dtype)
    return key_templates(model.sharded_state_dict(prefix=prefix), dict(model.named_parameters()),
                         cfg.num_layers, cfg.num_experts, layers=LAYERS, strip=prefix)


def write_talker(path: Path, metadata: dict, prefix: str, cfg: TalkerConfig, writer: ShardedWriter) -> set:
    """The Talker's tensors, layer by layer, in transformers' names; returns the checkpoint keys read."""
    keys = talker_templates(cfg, prefix, metadata[prefix + ANCHOR].dtype)
    check_against_metadata(keys, metadata)
    table = {ours: (row, hf) for row, ours, hf in expand_table(cfg)}
    for layer in [None] + list(range(cfg.num_layers)):
        for name, tensor in read_layer(path, keys, metadata, layer).items():
            row, hf_names = table[name]
            for hf_name, piece in zip(hf_names, to_hf(row, tensor, cfg)):
                writer.add(hf_name, piece)
    return set(keys)


def batches(metadata: dict, keys: List[str], budget: int) -> Iterator[List[str]]:
    """``keys`` in groups of at most ``budget`` bytes (a larger tensor alone)."""
    batch, size = [], 0
    for key in keys:
        nbytes = metadata[key].dtype.itemsize * torch.Size(metadata[key].global_shape).numel()
        if batch and size + nbytes > budget:
            yield batch
            batch, size = [], 0
        batch.append(key)
        size += nbytes
    if batch:
        yield batch


def checkpoint_voices(ckpt: Path) -> Dict[str, int]:
    """{voice name: codec id} of the voices a checkpoint records (``voice.<name>.id``; none: empty)."""
    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt))
    keys = [k for k in metadata if VOICE_ID.match(k)]
    if not keys:
        return {}
    return {VOICE_ID.match(k).group(1): int(t) for k, t in read_whole(Path(ckpt), metadata, keys).items()}


def add_voices(config_path: Path, voices: Dict[str, int]) -> None:
    """Name ``voices`` in the ``talker_config.speaker_id`` of an HF config.json (an imported run's config,
    copied as is, predates them)."""
    config = json.loads(Path(config_path).read_text())
    if not voices or not config.get("talker_config"):
        return
    config["talker_config"]["speaker_id"] = {**(config["talker_config"].get("speaker_id") or {}), **voices}
    Path(config_path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_code2wav(path: Path, metadata: dict, keys: List[str], writer: ShardedWriter, budget: int) -> set:
    for batch in batches(metadata, keys, budget):
        for key, tensor in read_whole(path, metadata, batch).items():
            writer.add(code2wav_hf_name(key), tensor)
    return set(keys)


def write_audio_output(sources, hf_config: Optional[dict], writer: ShardedWriter, budget: int) -> Dict[Path, set]:
    """Talker and Code2Wav from the first source holding each; returns {checkpoint: keys read}. Raises when
    a Talker is held but the HF config has none to export it into."""
    used: Dict[Path, set] = {}
    found = find_talker(sources)
    if found is not None:
        path, metadata, prefix = found
        cfg = audio_output_config(hf_config or {})
        if cfg is None:
            raise ValueError(f"{path} holds a Talker ({prefix}backbone.*) but the export's config has no audio "
                             "output (enable_audio_output=false or no talker_config) to export it into")
        used.setdefault(path, set()).update(write_talker(path, metadata, prefix, cfg, writer))
        used[path].update(k for k in metadata if k.startswith(VOICE))  # in the codec table and speaker_id already
    code2wav = find_code2wav(sources)
    if code2wav is not None:
        path, metadata, keys = code2wav
        used.setdefault(path, set()).update(write_code2wav(path, metadata, keys, writer, budget))
    return used


# ---------------------------------------------------------------------------------------------------
# training


def load_talker(ckpt: Path, layout: ParallelConfig, *, device="cpu", params_dtype: torch.dtype = torch.float32,
                recompute: str = "none") -> Talker:
    """Our Talker (sizes from the checkpoint's config.json) for this rank, with the weights of the first of
    the checkpoint and its import that holds one; megatron's parallel state set up for ``layout``."""
    ckpt = Path(ckpt)
    sources = checkpoint_sources(ckpt)
    found = find_talker(sources)
    if found is None:
        notes = [json.loads((p / MARKER).read_text()).get("audio_output") for p, _ in sources]
        why = next((n for n in notes if n and n != IMPORTED), "no talker.* tensors")
        raise ValueError(f"{ckpt} holds no Talker to train ({why}); import the HF directory at --tp 1 --pp 1")
    config_path = ckpt / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{ckpt}: no config.json (the HF config an import keeps beside its weights)")
    cfg = audio_output_config(json.loads(config_path.read_text()))
    if cfg is None:
        raise ValueError(f"{config_path}: no Talker (enable_audio_output=false or no talker_config)")
    path, _, prefix = found
    talker = build_talker(cfg, layout, device=device, params_dtype=params_dtype, recompute=recompute)
    safe_load.apply()
    loaded = dist_checkpointing.load(talker.sharded_state_dict(prefix=prefix), str(path))
    talker.load_state_dict({k[len(prefix):]: v for k, v in loaded.items()})
    return talker
