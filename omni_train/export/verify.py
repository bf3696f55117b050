"""omni-convert verify: an HF directory imported into our model in memory gives transformers' logits.

    omni-convert verify HF_DIR [--tp N --ep N] [--atol X]          (torchrun for N > 1)

The LM goes through import's own path (``check_hf_lm``, ``fill_lm``: the bridge table,
the same clear errors for sizes we cannot represent), in fp32, without writing a checkpoint; the towers
load by name into ``OmniThinker``. The same seeded synthetic inputs go through transformers' model loaded
from the directory (fp32) and through ours: per input kind (text, audio, image, video, audio in video; text
alone for a Qwen3-MoE directory) the max and mean absolute logit difference are printed, and any max above
``--atol`` ends the command with status 1 and a message naming the kind and the numbers.

Inputs are laid out as the processor lays them out: placeholder counts from the tower configs (audio
chunks of ``2 * n_window`` mel frames, vision grids of whole ``spatial_merge_size`` blocks), placeholder
ids from the HF config, audio in video interleaved by timestamp (video first on ties). Position ids: the
reference gets transformers' ``get_rope_index``, ours gets ``rope_index.tm_rope_position_ids`` (what the
data pipeline writes), so a TM-RoPE disagreement shows up as a logit difference too.

With audio output (a talker and code2wav our Talker can take at this layout: export/talker.py's rule), the
Talker and Code2Wav are checked too (verify_talker.py): codebook-0 and residual logits of our imported Talker
and Code2Wav's waveform on seeded inputs (kinds ``talker_codec0``, ``talker_residual``, ``code2wav``), and
every imported Talker / Code2Wav tensor against what transformers loaded (a difference names the tensor).
Where import would carry them unchanged instead, a note on stderr says why they were not checked.

Multi-process: every rank builds its shard of our model and runs the same inputs; rank 0 alone loads the
reference (first, and frees it before building ours), compares and prints. The towers need tp = 1
(``build_omni_thinker``'s rule): at tp > 1 an Omni directory is checked on text only, through the LM.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    Qwen3OmniMoeAudioEncoder,
    Qwen3OmniMoeVisionEncoder,
    _get_feat_extract_output_lengths,
)

from omni_train.config.schema import ParallelConfig
from omni_train.export import verify_talker
from omni_train.export.convert import SOURCES, TEXT_ONLY, check_hf_lm, fill_lm, read_hf_config
from omni_train.models.thinker.hf_sources import detect_source  # noqa: F401 (re-exported)
from omni_train.export.hf_io import HFReader
from omni_train.export.talker import AudioOutput, plan_audio_output
from omni_train.models.thinker.bridge import model_config_from_hf
from omni_train.models.thinker.lm import build_thinker_lm
from omni_train.models.thinker.omni import OmniThinker, PlaceholderIds
from omni_train.models.thinker.rope_index import tm_rope_position_ids

KINDS = ("text", "audio", "image", "video", "audio_in_video")
SEED = 1234
MIN_LENGTH = 16  # tokens per row


@dataclass
class Case:
    """One input kind: token rows [B, S], our position ids [3, B, S], the reference's get_rope_index
    arguments and the forward's media arguments (the same tensors for both models)."""

    kind: str
    input_ids: torch.Tensor
    positions: torch.Tensor
    rope: dict = field(default_factory=dict)
    media: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# inputs


class _Inputs:
    """Seeded token rows and media for one HF thinker config (None: a text-only Qwen3-MoE)."""

    def __init__(self, vocab_size: int, thinker: Optional[Qwen3OmniMoeThinkerConfig]):
        self.gen = torch.Generator().manual_seed(SEED)
        self.cfg = thinker
        special = {v for k, v in vars(thinker).items() if k.endswith("_token_id") and isinstance(v, int)} \
            if thinker is not None else set()
        self.pool = torch.tensor([i for i in range(vocab_size) if i not in special])
        # the configs hold no end-marker ids; the models read none of them, any plain token does
        self.end = int(self.pool[-1])

    def text(self, n: int) -> List[int]:
        return self.pool[torch.randint(len(self.pool), (n,), generator=self.gen)].tolist()

    def rows(self, kind: str, blocks: List[Tuple[List[int], dict]]) -> Case:
        """Each row: 2 text tokens, its media block, text up to a common length; positions from rope_index."""
        length = max(MIN_LENGTH, 4 + max(len(tokens) for tokens, _ in blocks))
        ids, ours = [], []
        for tokens, features in blocks:
            row = self.text(2) + tokens + self.text(length - 2 - len(tokens))
            items = [SimpleNamespace(kind=features.pop("kind"), span=(2, 2 + len(tokens)), features=features)] \
                if tokens else []
            ids.append(row)
            ours.append(self.positions(row, items))
        positions = torch.stack(ours, dim=1)
        return Case(kind, torch.tensor(ids), positions if positions.is_floating_point() else positions.float())

    def positions(self, row: List[int], items) -> torch.Tensor:
        if self.cfg is None:
            return torch.arange(len(row)).expand(3, -1)
        c = self.cfg
        return tm_rope_position_ids(
            torch.tensor(row), items, image_token_id=c.image_token_id, video_token_id=c.video_token_id,
            audio_token_id=c.audio_token_id, vision_start_token_id=c.vision_start_token_id,
            audio_start_token_id=c.audio_start_token_id, spatial_merge_size=c.vision_config.spatial_merge_size,
            position_id_per_seconds=c.position_id_per_seconds)

    # ----- media ------------------------------------------------------------------------------------

    def audio_frames(self) -> List[int]:
        """Mel frame counts: a full chunk plus a partial one, and a partial one. transformers counts 13
        tokens per full chunk (get_rope_index), true only for n_window 50: other windows get partial ones."""
        chunk = 2 * self.cfg.audio_config.n_window
        tokens = chunk
        for _ in range(3):  # the tower's three stride-2 convolutions over one chunk
            tokens = (tokens - 1) // 2 + 1
        full = tokens == 13
        return [chunk + chunk * 3 // 10, chunk * 6 // 10] if full else [chunk * 9 // 10, chunk * 6 // 10]

    def audio_tokens(self, frames: int) -> int:
        return int(_get_feat_extract_output_lengths(torch.tensor(frames), self.cfg.audio_config.n_window))

    def audio(self, frames: List[int]) -> dict:
        mask = torch.zeros(len(frames), max(frames), dtype=torch.long)
        for i, f in enumerate(frames):
            mask[i, :f] = 1
        mel = self.cfg.audio_config.num_mel_bins
        return dict(input_features=torch.randn(len(frames), mel, max(frames), generator=self.gen),
                    feature_attention_mask=mask)

    def grids(self, frames: int) -> List[Tuple[int, int, int]]:
        m = self.cfg.vision_config.spatial_merge_size
        return [(frames, 2 * m, 2 * m), (frames, 2 * m, 3 * m)]

    def vision_tokens(self, grid) -> int:
        return grid[0] * grid[1] * grid[2] // self.cfg.vision_config.spatial_merge_size ** 2

    def pixels(self, grids) -> torch.Tensor:
        v = self.cfg.vision_config
        rows = sum(t * h * w for t, h, w in grids)
        return torch.randn(rows, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, generator=self.gen)


SECONDS_PER_GRID = (1.0, 0.5)  # 2 frames per grid at 2 fps, and at 4 fps (fractional temporal ids)


def _text_case(x: _Inputs) -> Case:
    return x.rows("text", [([], {}), ([], {})])


def _audio_case(x: _Inputs) -> Case:
    c, frames = x.cfg, x.audio_frames()
    blocks = [([c.audio_start_token_id] + [c.audio_token_id] * x.audio_tokens(f) + [x.end],
               dict(kind="audio", num_tokens=x.audio_tokens(f))) for f in frames]
    case = x.rows("audio", blocks)
    case.media = x.audio(frames)
    case.rope = dict(audio_seqlens=torch.tensor(frames))
    return case


def _vision_case(x: _Inputs, kind: str) -> Case:
    c = x.cfg
    token = c.image_token_id if kind == "image" else c.video_token_id
    grids = x.grids(1 if kind == "image" else 2)
    blocks = []
    for grid, seconds in zip(grids, SECONDS_PER_GRID):
        features = dict(kind=kind, grid_thw=grid, **({} if kind == "image" else {"second_per_grid": seconds}))
        blocks.append(([c.vision_start_token_id] + [token] * x.vision_tokens(grid) + [x.end], features))
    case = x.rows(kind, blocks)
    grid = torch.tensor(grids)
    if kind == "image":
        case.media = dict(pixel_values=x.pixels(grids), image_grid_thw=grid)
        case.rope = dict(image_grid_thw=grid)
    else:
        case.media = dict(pixel_values_videos=x.pixels(grids), video_grid_thw=grid)
        case.rope = dict(video_grid_thw=grid, second_per_grids=torch.tensor(SECONDS_PER_GRID))
    return case


def _interleave(x: _Inputs, grid, seconds: float, n_audio: int) -> List[int]:
    """Video and audio placeholders by timestamp (video first on ties), as Qwen3OmniMoeProcessor lays
    them out: frame t's tokens at t * seconds * position_id_per_seconds, audio token k at k."""
    c = x.cfg
    per_frame = x.vision_tokens((1,) + tuple(grid[1:]))
    step = seconds * c.position_id_per_seconds
    video = [(t * step, 0, c.video_token_id) for t in range(grid[0]) for _ in range(per_frame)]
    audio = [(float(k), 1, c.audio_token_id) for k in range(n_audio)]
    return [token for *_, token in sorted(video + audio, key=lambda v: v[:2])]


def _audio_in_video_case(x: _Inputs) -> Case:
    c, frames, grids = x.cfg, x.audio_frames(), x.grids(2)
    blocks = []
    for grid, seconds, f in zip(grids, SECONDS_PER_GRID, frames):
        n_audio = x.audio_tokens(f)
        tokens = [c.vision_start_token_id, c.audio_start_token_id] + _interleave(x, grid, seconds, n_audio)
        features = dict(kind="video", grid_thw=grid, second_per_grid=seconds, audio={"num_tokens": n_audio})
        blocks.append((tokens + [x.end, x.end], features))
    case = x.rows("audio_in_video", blocks)
    grid = torch.tensor(grids)
    case.media = dict(pixel_values_videos=x.pixels(grids), video_grid_thw=grid, **x.audio(frames))
    case.rope = dict(video_grid_thw=grid, second_per_grids=torch.tensor(SECONDS_PER_GRID),
                     use_audio_in_video=True, audio_seqlens=torch.tensor(frames))
    return case


CASES = {"text": _text_case, "audio": _audio_case, "image": lambda x: _vision_case(x, "image"),
         "video": lambda x: _vision_case(x, "video"), "audio_in_video": _audio_in_video_case}


def build_cases(vocab_size: int, thinker: Optional[Qwen3OmniMoeThinkerConfig], kinds=KINDS) -> List[Case]:
    """The seeded inputs of each kind, the same on every rank and every call."""
    inputs = _Inputs(vocab_size, thinker)
    return [CASES[kind](inputs) for kind in kinds]


# ---------------------------------------------------------------------------------------------------
# the two models


def reference_logits(hf_dir: Path, source: str, cases: List[Case]) -> Dict[str, torch.Tensor]:
    """transformers' model loaded from the directory in fp32 (thinker alone used), logits per kind."""
    return reference_outputs(hf_dir, source, cases)[0]


def reference_outputs(hf_dir: Path, source: str, cases: List[Case], probe: Optional[verify_talker.Probe] = None
                      ) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, str]]]:
    """transformers' model loaded from the directory in fp32: the thinker's logits per kind and, with an
    audio-output ``probe``, the Talker's and Code2Wav's outputs (verify_talker.py) and tensor digests."""
    from transformers import AutoModelForCausalLM, Qwen3OmniMoeForConditionalGeneration

    # eager experts: one matmul per expert, the plain definition (grouped_mm also wants 16-byte strides)
    load = dict(dtype=torch.float32, local_files_only=True, experts_implementation="eager")
    if source in TEXT_ONLY:
        full = None
        model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", **load)
    else:
        full = Qwen3OmniMoeForConditionalGeneration.from_pretrained(hf_dir, **load).eval()
        model = full.thinker
        model.config.text_config._attn_implementation = "eager"  # as the parity tests; towers keep SDPA
    model.eval()
    out = {}
    with torch.no_grad():
        for case in cases:
            ones = torch.ones_like(case.input_ids)
            if source in TEXT_ONLY:
                positions = case.positions[0].long()
            else:
                positions, _ = model.model.get_rope_index(case.input_ids, attention_mask=ones, **case.rope)
            out[case.kind] = model(input_ids=case.input_ids, attention_mask=ones, position_ids=positions,
                                   **case.media).logits
    audio, digests = verify_talker.reference_kinds(full, probe)
    out.update(audio)
    del model, full
    gc.collect()
    return out, digests


def _tower(cls, config, reader: HFReader, prefix: str):
    """A transformers tower (SDPA attention, fp32) with the directory's ``prefix*`` tensors, strictly."""
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    tower = cls(config).float()
    state = {n[len(prefix):]: reader.get(n) for n in reader.names() if n.startswith(prefix)}
    tower.load_state_dict(state, strict=True)
    return tower


def _per_expert(cfg):
    """One parameter per expert and projection, as the bridge table names them (what import builds)."""
    return dataclasses.replace(cfg, experts_impl="sequential")


def _filled_lm(reader: HFReader, cfg, source: str, layout: ParallelConfig):
    """The rank's LM filled by import's ``fill_lm``. Built on the CPU (random init first), not as
    ``build_empty_lm`` builds it: "meta" then ``to_empty`` leaves non-persistent buffers (the rotary
    frequencies) uninitialized, which a checkpoint never holds but a forward reads."""
    lm = build_thinker_lm(_per_expert(cfg), layout, device="cpu", params_dtype=torch.float32)
    splits = {n: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", 0))
              for n, p in lm.named_parameters()}
    fill_lm(lm, splits, reader, cfg, source)
    return lm


def import_in_memory(hf_dir: Path, source: str, layout: ParallelConfig, with_towers: bool):
    """Our model for this rank, filled from the HF directory as `omni-convert import` fills it, in fp32:
    the OmniThinker (towers + LM) or, for a text-only directory (Qwen3-MoE, dense Qwen3) or
    ``with_towers=False``, the LM."""
    config, text = read_hf_config(hf_dir, source)
    cfg = model_config_from_hf(text)
    reader = HFReader(hf_dir)
    check_hf_lm(reader, cfg, source)
    lm = _filled_lm(reader, cfg, source, layout)
    if not with_towers or source in TEXT_ONLY:
        return lm.eval()
    thinker = Qwen3OmniMoeThinkerConfig(**config["thinker_config"])
    audio = _tower(Qwen3OmniMoeAudioEncoder, thinker.audio_config, reader, "thinker.audio_tower.")
    visual = _tower(Qwen3OmniMoeVisionEncoder, thinker.vision_config, reader, "thinker.visual.")
    ids = PlaceholderIds(audio=thinker.audio_token_id, image=thinker.image_token_id, video=thinker.video_token_id)
    return OmniThinker(audio, visual, lm, ids).eval()


def our_logits(model, cases: List[Case], tp: int) -> Dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for case in cases:
            logits = model(case.input_ids, case.positions, None, **case.media)
            if tp > 1:  # vocab-parallel output: gather the vocabulary shards
                logits = gather_from_tensor_model_parallel_region(logits)
            out[case.kind] = logits
    return out


# ---------------------------------------------------------------------------------------------------
# comparison


@dataclass
class Difference:
    kind: str
    max_abs: float
    mean_abs: float
    shape: Tuple[int, ...]

    def line(self) -> str:
        what = "waveform" if self.kind == "code2wav" else "logits"
        return (f"  {self.kind:<15} max |diff| {self.max_abs:.3e}   mean |diff| {self.mean_abs:.3e}   "
                f"{what} {list(self.shape)}")


def compare(reference: Dict[str, torch.Tensor], ours: Dict[str, torch.Tensor]) -> List[Difference]:
    out = []
    for kind, ref in reference.items():
        got = ours[kind]
        if got.shape != ref.shape:
            raise ValueError(f"{kind}: our logits have shape {list(got.shape)}, transformers' {list(ref.shape)}")
        diff = (got.double() - ref.double()).abs()
        out.append(Difference(kind, diff.max().item(), diff.mean().item(), tuple(ref.shape)))
    return out


def failure_message(diffs: List[Difference], atol: float) -> Optional[str]:
    bad = [d for d in diffs if not d.max_abs <= atol]  # NaN fails too
    if not bad:
        return None
    kinds = ", ".join(f"{d.kind} (max |diff| {d.max_abs:.3e} > atol {atol:.1e}, mean {d.mean_abs:.3e})"
                      for d in bad)
    return f"outputs differ from transformers' for {kinds}" if any(d.kind in verify_talker.KINDS for d in bad) \
        else f"logits differ from transformers' for {kinds}"


# ---------------------------------------------------------------------------------------------------
# the command


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _from_rank0(message: Optional[str]) -> Optional[str]:
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return message


def verify(hf_dir: Path, layout: ParallelConfig, atol: float = 1e-4) -> Optional[List[Difference]]:
    """Compare, print (rank 0) and return rank 0's differences (None on other ranks); raises SystemExit(1)
    on every rank when a kind's max difference is above ``atol`` or an imported Talker tensor differs from
    transformers'. Megatron's parallel state must be set up for ``layout``."""
    hf_dir = Path(hf_dir)
    source = detect_source(hf_dir)
    config, text = read_hf_config(hf_dir, source)
    cfg = model_config_from_hf(text)
    reader = HFReader(hf_dir)
    # before loading anything, what import refuses fails first: tensors, then the layer config (on "meta")
    check_hf_lm(reader, cfg, source)
    build_thinker_lm(_per_expert(cfg), layout, device="meta", params_dtype=torch.float32)
    audio = plan_audio_output(config, reader, layout) if source == "qwen3_omni_moe" else AudioOutput()
    with_towers = source == "qwen3_omni_moe" and layout.tp == 1
    thinker = Qwen3OmniMoeThinkerConfig(**config["thinker_config"]) if with_towers else None
    cases = build_cases(cfg.vocab_size, thinker, KINDS if with_towers else ("text",))
    probe = verify_talker.build_probe(audio.cfg, config.get("code2wav_config") or {}) if audio.cfg else None
    if _rank() == 0:
        print(f"omni-convert verify: {hf_dir} ({SOURCES[source][0]}, tp={layout.tp} ep={layout.ep}, fp32, "
              f"atol {atol:.1e})", flush=True)
        if source == "qwen3_omni_moe" and not with_towers:
            print("  (audio, image and video skipped: the towers run at tp=1 only; run verify without --tp)",
                  flush=True)
        if audio.carried_reason:  # stderr: the table on stdout lists what was compared
            print(f"omni-convert verify: talker and code2wav not checked (import carries them unchanged): "
                  f"{audio.carried_reason}", file=sys.stderr, flush=True)
    reference, digests = reference_outputs(hf_dir, source, cases, probe) if _rank() == 0 else (None, None)
    ours = our_logits(import_in_memory(hf_dir, source, layout, with_towers), cases, layout.tp)
    tensors = None
    if probe is not None:
        talker_out, tensors = verify_talker.check_audio_output(audio, reader, config.get("code2wav_config") or {},
                                                               layout, digests, probe)
        ours.update(talker_out)
    diffs, message = None, None
    if _rank() == 0:
        diffs = compare(reference, ours)
        for d in diffs:
            print(d.line(), flush=True)
        message = "; ".join(m for m in (failure_message(diffs, atol), tensors) if m) or None
    message = _from_rank0(message)
    if message is not None:
        raise SystemExit(f"omni-convert verify: {message}" if _rank() == 0 else 1)
    if _rank() == 0:
        print(f"omni-convert verify: OK ({', '.join(d.kind for d in diffs)} within atol {atol:.1e})", flush=True)
    return diffs


def run_cli(args, layout: ParallelConfig) -> None:
    """``omni-convert verify``: import errors (a size or field we cannot represent) as one line, status 1."""
    try:
        verify(args.hf_dir, layout, args.atol)
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"omni-convert verify: {error}") from None
