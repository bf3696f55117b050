"""The model the Talker's stages train (here, beside them: it reads checkpoints and frozen models): the frozen
Thinker that conditions the Talker, and the Talker.

    ThinkerTalker
      thinker   FrozenModel(OmniThinker): eval mode, every parameter requires_grad=False, run under no_grad;
                held as a plain attribute, not a submodule
      talker    Talker (model.py): backbone, projections, code predictor; the only submodule, all of it trains
      code2wav  FrozenModel(Code2Wav) or None: turns generated codes into speech (audio samples, export);
                held like the Thinker. Built from ``model.code2wav`` (a seeded random one for a run without an
                import); in the checkpoints as ``code2wav.model.*``, the keys an import writes.

One model, so that the session builds, wraps, checkpoints and restores it as it does any stage's model. The
Thinker is outside its module tree: nothing that walks the trained model's parameters or modules (the
data-parallel wrapper's gradient buffers, the optimizer, ``stage.trainable``, the MoE load tracker, ``.to()``)
reaches it, so it has no gradient buffer and no optimizer state whatever the trainable patterns say, and it
stays on the device it was built on. Its tensors are in the checkpoints (``sharded_state_dict`` names both
parts), saved and reloaded bit for bit. Its state keeps the keys of
the two models' own checkpoints: the Thinker's as a Thinker checkpoint holds them (LM keys unprefixed, towers
``carried.thinker.*``), the Talker's under ``talker.`` (export/talker.py reads both). ``load_init`` starts it
from a Thinker checkpoint (the Talker keeps its fresh init) or from one that holds both (an import, or an earlier
Talker stage).

Forward (one micro-batch, data/talker_batch.py): the Thinker runs on the conversations' ids and media with its
embeddings and the accept layer's states captured (thinker_signals.py), then the Talker's teacher-forced loss
runs on each row's conversation (conditioning.py) and returns model.py's losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch import nn

from omni_train.checkpoint import safe_load
from omni_train.frozen import FrozenModel
from omni_train.models.talker.conditioning import TalkerSample
from omni_train.models.talker.model import Talker, _replica_id
from omni_train.models.talker.thinker_signals import run_to_accept_layer

THINKER, TALKER, CODE2WAV = "thinker.", "talker.", "code2wav."
TALKER_ANCHOR = "talker.backbone.embedding.word_embeddings.weight"  # a checkpoint holds a Talker iff this


class ThinkerTalker(nn.Module):
    def __init__(self, thinker: nn.Module, talker: Talker, code2wav: Optional[nn.Module] = None):
        super().__init__()
        object.__setattr__(self, "thinker", FrozenModel("thinker", thinker))  # not registered: see above
        object.__setattr__(self, "code2wav", None if code2wav is None else FrozenModel("code2wav", code2wav))
        self.talker = talker

    # what megatron's DDP, schedule and the loop read: the trained model's
    config = property(lambda self: self.talker.config)
    model_type = property(lambda self: self.talker.model_type)

    def set_input_tensor(self, input_tensor) -> None:
        self.talker.set_input_tensor(input_tensor)

    # ----- checkpoints --------------------------------------------------------------------------------

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        thinker = self.thinker.module.sharded_state_dict(prefix=prefix, sharded_offsets=sharded_offsets,
                                                         metadata=metadata)
        talker = self.talker.sharded_state_dict(prefix=f"{prefix}{TALKER}", sharded_offsets=sharded_offsets,
                                                metadata=metadata)
        state = {**{f"{THINKER}{key}": value for key, value in thinker.items()}, **talker}
        if self.code2wav is not None:
            replica = _replica_id()
            for name, tensor in self.code2wav.module.state_dict(keep_vars=True).items():
                key = f"{prefix}{CODE2WAV}{name}"
                state[key] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=replica)
        return state

    def load_state_dict(self, state_dict, strict: bool = True):
        parts: Dict[str, dict] = {THINKER: {}, TALKER: {}, CODE2WAV: {}}
        for key, value in state_dict.items():
            head = next((p for p in parts if key.startswith(p)), None)
            if head is None:
                raise KeyError(f"unexpected key {key!r} in a ThinkerTalker state dict")
            parts[head][key[len(head):]] = value
        self.thinker.module.load_state_dict(parts[THINKER], strict=strict)
        if self.code2wav is not None:
            self.code2wav.module.load_state_dict(parts[CODE2WAV], strict=strict)
        elif parts[CODE2WAV] and strict:
            raise KeyError("a ThinkerTalker without a Code2Wav got code2wav.* keys")
        return self.talker.load_state_dict(parts[TALKER], strict=strict)

    # ----- forward ------------------------------------------------------------------------------------

    @torch.no_grad()
    def thinker_signals(self, batch) -> Dict[str, torch.Tensor]:
        """The Thinker's input embeddings and accept-layer states [B, L, Ht] of the micro-batch's rows (its forward
        stops there: the layers after it and its logits are never computed)."""
        thinker = self.thinker.module
        media = thinker.prepare_media(batch["media"], batch["media_sizes"], batch["input_ids"].device)
        return run_to_accept_layer(lambda: thinker(batch["input_ids"], batch["position_ids"], **media),
                                   thinker.language_model, self.talker.cfg.accept_hidden_layer)

    def samples(self, batch, signals) -> List[TalkerSample]:
        text = self.talker.cfg.text
        table = self.thinker.module.language_model.embedding.word_embeddings.weight
        tts = F.embedding(torch.tensor([text.tts_bos, text.tts_eos, text.tts_pad], device=table.device), table)
        codes = batch["codes"].split(batch["frames"])
        positions = batch["talker_position_ids"].split(batch["talker_lengths"], dim=1)
        out = []
        for b, n in enumerate(batch["lengths"]):
            out.append(TalkerSample(batch["input_ids"][b, :n], signals["embeds"][b, :n], signals["hidden"][b, :n],
                                    tts, codes[b], batch["speakers"][b], position_ids=positions[b]))
        return out

    def forward(self, batch):
        """model.py's Talker losses of the micro-batch (``loss``, ``loss_codec0``, ``loss_residual``,
        ``report``)."""
        return self.talker(self.samples(batch, self.thinker_signals(batch)))


def load_init(path: Path, model: nn.Module) -> str:
    """Stage hand-off into a ThinkerTalker (``model`` or its data-parallel wrapper): the Thinker from
    checkpoint ``path``, the Talker too when ``path`` holds one, the Code2Wav too when it holds one (else it
    keeps its seeded build); returns what was loaded."""
    safe_load.apply()
    module = getattr(model, "module", model)
    keys = dist_checkpointing.load_tensors_metadata(str(path))
    with_talker = TALKER_ANCHOR in keys
    with_code2wav = module.code2wav is not None and any(k.startswith(CODE2WAV) for k in keys)
    wanted = (THINKER,) + ((TALKER,) if with_talker else ()) + ((CODE2WAV,) if with_code2wav else ())
    state = {k: v for k, v in module.sharded_state_dict().items() if k.startswith(wanted)}
    loaded = dist_checkpointing.load({"model": state}, str(path))["model"]
    module.thinker.module.load_state_dict({k[len(THINKER):]: v for k, v in loaded.items() if k.startswith(THINKER)})
    if with_code2wav:
        module.code2wav.module.load_state_dict({k[len(CODE2WAV):]: v for k, v in loaded.items()
                                                if k.startswith(CODE2WAV)})
    if with_talker:
        module.talker.load_state_dict({k[len(TALKER):]: v for k, v in loaded.items() if k.startswith(TALKER)})
    what = "Thinker and Talker" if with_talker else "Thinker (the Talker starts from its initialisation)"
    return what + (" and Code2Wav" if with_code2wav else "")
