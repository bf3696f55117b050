"""The Talker's speaker fine-tuning (report section 4.2, its fourth stage): one speaker's spoken answers teach the
Talker a named voice, a new one or one of ``model.talker.codec.speakers`` refined (``stage.speaker``).

A voice is one codec-vocabulary token at prefix position 6 (models/talker/conditioning.py): its embedding row
is all that tells the Talker who speaks. The voice's row is a parameter of its own (``voice.row``), which the
Talker reads in place of that row of its codec embedding (``VoiceTalker.codec_embed``); the codec embedding
itself is frozen (conf/stage/speaker_finetune.yaml: ``^talker\\.`` and ``^voice\\.`` train, but not
``^talker\\.backbone\\.embedding\\.``). Why not train that row of the table: megatron's AdamW applies decoupled
weight decay to every parameter it steps, so training the table for one row would move every other row (the
other speakers', the codes') even where their gradient is zero. Frozen, the table is bit-identical after the
stage; a recipe that trains it anyway (stage.trainable) moves it, as it asks.

Voice id (config/validate.py ``speaker_codec_id``, checked before anything is built): an existing voice keeps
its own; a new one takes ``stage.speaker.id``, else the first free id above every special and speaker id (2304
for the release's 2301-2303), always inside the top 1024 ids of the codec vocabulary, which generate never
samples, so the Talker cannot emit it as a code. Its row starts as the mean of the configured speakers' rows
(``init: mean``) or a named speaker's row (``init: <name>``); an existing voice starts from its own row.

Checkpoints: the voice's row is also written into the codec table's row at its id before every save (that row
is never read while training: the voice's parameter stands in for it), so the checkpoint's table is the trained
Talker's and any reader (a later stage's ``init_from``, export) sees the voice. Besides, ``voice.<name>.row``
(the parameter, with its optimizer state: exact resume) and ``voice.<name>.id`` (int64 [1]) record the voice:
export writes ``talker_config.speaker_id[<name>] = id`` from them (export/talker.py ``checkpoint_voices``), and
a speaker_finetune run started from such a checkpoint continues that voice.

Data: talker_pretrain's (one conversation per row); with ``override_data_speaker`` every row speaks with the
voice, else a sample's ``speaker.id`` may name it. Build, forward, loss, Thinker hand-off and the spoken samples
at the end (stages/audio_samples.py, in the voice) are talker_pretrain's. Pipeline parallelism (pp > 1) is not
supported: the voice lives on the first stage only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch import nn

from omni_train.checkpoint import safe_load
from omni_train.config.validate import speaker_codec_id, speaker_problems
from omni_train.models.talker.model import Talker, _replica_id
from omni_train.stages import Stage, talker_pretrain
from omni_train.stages.audio_samples import write_audio_samples
from omni_train.stages.thinker_talker import ThinkerTalker, load_init as load_thinker_talker

VOICE = "voice."  # checkpoint keys voice.<name>.row, voice.<name>.id


def voice_config(cfg):
    """(cfg with the voice in model.talker.codec.speakers, voice name, its codec id); ValueError naming the
    stage.speaker key that cannot be."""
    speaker, talker = cfg.stage.speaker, cfg.model.talker
    if speaker is None:
        raise ValueError("stage.speaker: speaker_finetune needs the voice it trains (stage.speaker.name)")
    problems = speaker_problems(speaker, talker)
    if problems:
        raise ValueError("{}: {}".format(*problems[0]))
    voice_id = speaker_codec_id(speaker, talker)
    codec = dataclasses.replace(talker.codec, speakers={**talker.codec.speakers, speaker.name: voice_id})
    model = dataclasses.replace(cfg.model, talker=dataclasses.replace(talker, codec=codec))
    return dataclasses.replace(cfg, model=model), speaker.name, voice_id


class Voice(nn.Module):
    """The voice's codec-embedding row ``row`` [H] (trained) and its codec id (``codec_id``; buffer ``id``, int64
    [1], for the checkpoints); ``speakers`` / ``init``: the configured speakers and stage.speaker.init, where a
    new voice's row starts (``init_voice``)."""

    def __init__(self, name: str, voice_id: int, hidden_size: int, device, dtype: torch.dtype,
                 speakers: Dict[str, int], init: str):
        super().__init__()
        self.name, self.codec_id = name, voice_id
        self.speakers, self.init = dict(speakers), init
        self.row = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype))
        self.register_buffer("id", torch.tensor([voice_id], device=device))

    @torch.no_grad()
    def load(self, saved: Dict[str, torch.Tensor], source) -> None:
        """The row of a saved voice ({"id", "row"}, from ``source``), which must have this voice's codec id."""
        if int(saved["id"]) != self.codec_id:
            raise ValueError(f"stage.speaker: {source} holds voice {self.name!r} at codec id {int(saved['id'])}, "
                             f"the config gives {self.codec_id}")
        self.row.copy_(saved["row"])


class VoiceTalker(Talker):
    """The Talker whose codec embedding reads the voice's row (``Voice.row``) at the voice's id. The voice is
    held, not registered: it is the ThinkerTalker's (``voice.*``), so the Talker's own state keeps its keys."""

    def __init__(self, talker: Talker, voice: Voice):
        super().__init__(talker.cfg, talker.backbone, talker.code_predictor, talker.text_projection,
                         talker.hidden_projection, talker.codec_table, talker.residual_tables)
        object.__setattr__(self, "voice", voice)

    def codec_embed(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().codec_embed(ids)
        at = (ids == self.voice.codec_id).unsqueeze(-1)
        return torch.where(at, self.voice.row.to(rows.dtype), rows)

    @torch.no_grad()
    def table_row(self, voice_id: int) -> Optional[torch.Tensor]:
        """This tensor-parallel rank's codec-table row ``voice_id`` (a view), or None where another rank holds it."""
        table = self.backbone.embedding.word_embeddings
        start = getattr(table, "vocab_start_index", 0)
        local = voice_id - start
        return table.weight[local] if 0 <= local < table.weight.shape[0] else None

    @torch.no_grad()
    def table_rows(self, ids) -> torch.Tensor:
        """Whole rows of the codec table (summed over tensor-parallel vocabulary shards)."""
        return super().codec_embed(torch.tensor(list(ids), device=self.voice.row.device))


class SpeakerThinkerTalker(ThinkerTalker):
    """ThinkerTalker (thinker_talker.py) with the voice (``voice``, its only other submodule)."""

    def __init__(self, base: ThinkerTalker, voice: Voice):
        code2wav = base.code2wav.module if base.code2wav is not None else None
        super().__init__(base.thinker.module, VoiceTalker(base.talker, voice), code2wav)
        self.voice = voice

    def merge_voice(self) -> None:
        """Write the voice's row into the codec table's row at its id (never read while training)."""
        row = self.talker.table_row(self.voice.codec_id)
        if row is not None:
            with torch.no_grad():
                row.copy_(self.voice.row)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        self.merge_voice()
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        key, replica = f"{prefix}{VOICE}{self.voice.name}.", _replica_id()
        state[f"{prefix}{VOICE}row"] = ShardedTensor.from_rank_offsets(key + "row", self.voice.row, replica_id=replica)
        state[f"{prefix}{VOICE}id"] = ShardedTensor.from_rank_offsets(key + "id", self.voice.id, replica_id=replica)
        return state

    def load_state_dict(self, state_dict, strict: bool = True):
        voice = {k[len(VOICE):]: v for k, v in state_dict.items() if k.startswith(VOICE)}
        if voice or strict:
            self.voice.load(voice, "the checkpoint")
        return super().load_state_dict({k: v for k, v in state_dict.items() if not k.startswith(VOICE)}, strict)


@torch.no_grad()
def init_voice(model: "SpeakerThinkerTalker", speakers: Dict[str, int], init: str) -> str:
    """The voice's row from the codec table: its own row for a configured voice; else the mean of the
    configured speakers' rows or one speaker's row. Returns what it took."""
    voice, talker = model.voice, model.talker
    others = {name: i for name, i in speakers.items() if name != voice.name}
    if len(others) < len(speakers):
        what = f"its own row {voice.codec_id}"
        rows = talker.table_rows([voice.codec_id])
    elif init == "mean":
        what = f"the mean of {', '.join(sorted(others))}"
        rows = talker.table_rows(others.values())
    else:
        what = f"{init}'s row"
        rows = talker.table_rows([others[init]])
    voice.row.copy_(rows.float().mean(0).to(voice.row.dtype))
    return what


def build_model(cfg, env, params_dtype, pre_process=True, post_process=True):
    if cfg.parallel.pp > 1:
        raise NotImplementedError("parallel.pp: speaker_finetune runs at pp = 1 (the voice is the first stage's)")
    voiced, name, voice_id = voice_config(cfg)
    base = talker_pretrain.build_model(voiced, env, params_dtype, pre_process, post_process)
    voice = Voice(name, voice_id, voiced.model.talker.hidden_size, env.device, params_dtype,
                  cfg.model.talker.codec.speakers, cfg.stage.speaker.init)
    model = SpeakerThinkerTalker(base, voice)
    init_voice(model, voice.speakers, voice.init)  # a run without init_from keeps this
    return model


def load_init(path: Path, model: nn.Module) -> str:
    """thinker_talker's hand-off, then the voice: the checkpoint's own when it holds this voice (a speaker_finetune
    checkpoint: continued), else from the loaded codec table (``init_voice``)."""
    module = getattr(model, "module", model)
    loaded = load_thinker_talker(path, model)
    voice = module.voice
    if f"{VOICE}{voice.name}.row" not in dist_checkpointing.load_tensors_metadata(str(path)):
        what = init_voice(module, voice.speakers, voice.init)
        return f"{loaded}, voice {voice.name!r} (codec id {voice.codec_id}) started as {what}"
    safe_load.apply()
    state = {k: v for k, v in module.sharded_state_dict().items() if k.startswith(VOICE)}
    saved = dist_checkpointing.load({"model": state}, str(path))["model"]
    voice.load({k[len(VOICE):]: saved[k] for k in state}, path)
    return f"{loaded}, voice {voice.name!r} (codec id {voice.codec_id}) continued"


class OneVoice:
    """A Talker batch source whose every row speaks with one voice (``stage.speaker.override_data_speaker``)."""

    def __init__(self, source, voice_id: int):
        self.source, self.voice_id = source, voice_id

    def next_microbatches(self):
        batches = self.source.next_microbatches()
        for batch in batches:
            batch["speakers"] = [self.voice_id] * len(batch["speakers"])
        return batches

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state) -> None:
        self.source.load_state_dict(state)

    def stats(self):
        return self.source.stats()


def build_data(cfg, env):
    voiced, _, voice_id = voice_config(cfg)
    source = talker_pretrain.build_data(voiced, env)  # a sample's speaker.id may name the voice
    return OneVoice(source, voice_id) if cfg.stage.speaker.override_data_speaker else source


STAGE = Stage(build_model=build_model, build_data=build_data, forward=talker_pretrain.forward, load_init=load_init,
              finish=write_audio_samples)  # with the voice: OneVoice's rows, VoiceTalker's row
