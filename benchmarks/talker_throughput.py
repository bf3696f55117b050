"""Talker training throughput at the release width, on one GPU: omni-train's Talker (megatron MoE backbone +
code predictor, ``omni_train.models.talker``) against transformers' Qwen3-Omni Talker modules driven by the
same teacher-forced loss.

On the lent H200, from the repository root with .whl/ carried (arch_check.sh installs the wheels, then runs
``python3 benchmarks/talker_throughput.py --json $OUT/talker_throughput.json``; all within 450 s):
    bash benchmarks/arch_check.sh talker
On a CPU, to check the logic (tiny sizes, 3 steps a side, the loss-equality and FLOP cross-checks; ~2 min):
    python benchmarks/talker_throughput.py --smoke --json /tmp/talker_smoke.json

Model: the released Talker's widths (``TalkerConfig()``: hidden 1024, 16 / 2 heads of 128, 128 experts top-6
of FFN 384 plus a gated shared expert of 768, codec vocabulary 3072, projections 2048 -> 2048 -> 1024, the
code predictor at full size: 5 dense layers over 16 positions, 15 heads of 2048 codes) with ``--layers``
backbone layers (the release has 20), bf16 parameters, gradients and AdamW moments on both sides.

Data (seeded, the same tensors for both sides): ``--micro-batch`` conversations per step, each a Talker
sequence of ``--seq-length`` backbone positions (equal lengths: no padding) = a conditioning context of C
positions (C drawn in ``--context``; the user turn, C - 9 positions, two thirds audio placeholders, then the
9-position assistant prefix) + K = seq_length - C codec frames of 16 random codes (default 1,400-1,600 frames,
~2 minutes of speech at 12.5 Hz) and a reply of K // 4 text tokens (~3 per second of speech) riding on the
frames. The Thinker's signals (input embeddings, accept-layer hidden states, tts_* rows; width 2048) are random
tensors made before the timed steps: the Thinker is frozen and not part of the measured step. Everything
after them is: the Talker's projections of those signals, its codec embeddings, backbone, codec head, code
predictor, the loss, backward, clipping and the optimizer step.

Sides, each in its own subprocess with its own timeout (an OOM or a hang loses only that side):
- ``ours``: ``build_talker`` (world size 1: megatron parallel_state over one process, grouped-GEMM experts,
  local token dispatch, SDPA attention) and its forward (``Talker.forward``: conditioning.teacher_forced_sequence
  per conversation, codebook-0 CE at the target positions + 0.3 x residual CE of the code predictor's 15 heads;
  megatron's load-balancing loss, ``--aux-loss-coeff``, enters through the routers).
- ``transformers``: ``Qwen3OmniMoeTalkerForConditionalGeneration`` built from the same sizes
  (``talker.hf_config.hf_talker_config``), experts ``--hf-experts`` (grouped_mm; eager where unavailable), SDPA;
  its ``model`` (backbone) on the same inputs_embeds and positions, its ``codec_head`` at the same target
  positions, its ``code_predictor.model`` on the same teacher-forced [N frames, 16] inputs and its 15 ``lm_head``s,
  and the same loss written on those logits (torch CE on upcast logits, as transformers' losses do) plus
  transformers' own ``load_balancing_loss_func`` x the same coefficient. The sequence inputs are assembled by
  the same code as ours (``teacher_forced_sequence`` over transformers' ``text_projection``,
  ``hidden_projection``, ``model.codec_embedding`` and ``code_predictor.model.codec_embedding``).
- both: ``torch.optim.AdamW(fused=True)`` on the bf16 parameters (lr 3e-4, betas 0.9/0.95, weight decay 0.1;
  not megatron's optimizer or DDP: the comparison is the model), gradient clipping at 1.0.

Figures: each step ends with a device synchronisation; medians over the steps after ``--warmup``. Backbone
tokens/s (positions of the Talker sequence), frames/s, code-predictor positions/s (16 a frame), TFLOP/s from
``talker_flops`` (below) and MFU against ``omni_train.metrics.device_peak_flops`` (989 TFLOP/s, H100/H200).
Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps (max RSS on CPU).

FLOPs (``talker_flops``): training = 6 x multiply-accumulates of every matmul whose input needs a gradient
(forward, input gradient, weight gradient), 4 x where it does not (the projections' first layer reads the
frozen Thinker's signals: forward + weight gradient); norms, activations, softmax, embeddings not counted.
With h hidden, q = heads x head_dim, kv = kv heads x head_dim, E experts, top-k, f expert FFN, f_s shared FFN,
V codec vocabulary, per backbone position and layer:
    attention projections h (2q + 2kv), router h E, routed experts 3 h k f, shared expert 3 h f_s + its gate h;
core attention per sequence of S positions and layer: QK^T and AV over the S (S + 1) / 2 causal pairs,
q S (S + 1); codec head h V at each codebook-0 target (K + 1 per sequence); projections Ht -> Fp -> h per
projected row (the user turn, 3 + reply assistant rows, 3 tts rows). Code predictor per frame (G = 16
positions, hc, qc, kvc, fc its sizes, P layers): P [G (hc (2qc + 2kvc) + 3 hc fc) + qc G (G + 1)] + its heads
(G - 1) hc Vc. With --smoke the formula is checked against torch's FlopCounterMode on one forward + backward
of each side (matmuls exactly; attention through its full-square count, which is what the counter uses).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 3e-4, (0.9, 0.95), 1e-8, 0.1, 1.0
TEXT_TOKENS_PER_FRAME = 0.25  # reply text tokens per codec frame (~3 per second of speech at 12.5 Hz)
SIDES = ("ours", "transformers")
TIMEOUTS = {"ours": 240, "transformers": 210, "check": 300}
ENV_DROP = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")  # a world of one per side
# --smoke: tiny widths (16 code groups and the release codec vocabulary kept), fp32 on the CPU
SMOKE = dict(layers=2, seq_length=64, context="16-28", micro_batch=2, steps=3, warmup=1, deadline=900,
             timeouts={"ours": 300, "transformers": 300, "check": 300})
TINY = dict(hidden_size=64, num_attention_heads=4, num_query_groups=2, head_dim=16, num_experts=8, router_topk=2,
            moe_ffn_hidden_size=32, shared_expert_ffn_hidden_size=48, mrope_section=[4, 2, 2],
            thinker_hidden_size=96, projection_ffn_hidden_size=80)
TINY_PREDICTOR = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2, head_dim=16,
                      ffn_hidden_size=128)


# --------------------------------------------------------------------------------------------------
# Sizes, batches, FLOPs.


def talker_config(spec: dict):
    from omni_train.models.talker.config import CodePredictorConfig, TalkerConfig

    extra = dict(TINY, code_predictor=CodePredictorConfig(**TINY_PREDICTOR)) if spec["smoke"] else {}
    return TalkerConfig(num_layers=spec["layers"], aux_loss_coeff=spec["aux_loss_coeff"], **extra)


def draw_lengths(spec: dict) -> list:
    """Per step, per conversation: (context positions C, frames K); C + K = seq_length."""
    import torch

    low, high = (int(x) for x in spec["context"].split("-"))
    g = torch.Generator().manual_seed(spec["seed"])
    contexts = torch.randint(low, high + 1, (spec["warmup"] + spec["steps"], spec["micro_batch"]), generator=g)
    return [[(int(c), spec["seq_length"] - int(c)) for c in row] for row in contexts]


def sequence_layout(context: int, frames: int) -> dict:
    """What one conversation costs: backbone positions, frames, projected rows, codebook-0 targets."""
    user = context - 9  # the 9-position assistant prefix follows the user turn
    media = (user - 5) * 2 // 3  # <|im_start|> user <audio_start> audio x media text ... <|im_end|> \n
    reply = max(1, int(frames * TEXT_TOKENS_PER_FRAME))
    return dict(length=context + frames, frames=frames, media_rows=media,
                text_rows=(user - media) + 3 + reply + 3, targets=frames + 1, reply=reply)


def make_batches(spec: dict, cfg, device, dtype) -> list:
    """The steps' conversations (TalkerSample lists) on ``device``, seeded; the same on both sides."""
    import torch

    from omni_train.models.talker.conditioning import TalkerSample

    t, ht = cfg.text, cfg.thinker_hidden_size
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    words = lambda n: torch.randint(0, 150000, (n,), generator=g).tolist()  # noqa: E731  (no special id)
    batches = []
    for row in draw_lengths(spec):
        samples = []
        for context, frames in row:
            lay = sequence_layout(context, frames)
            user, media = context - 9, lay["media_rows"]
            ids = [t.im_start, t.user, t.audio_start, *[t.audio] * media, *words(user - 5 - media), t.im_end, 10,
                   t.im_start, t.assistant, 10, *words(lay["reply"]), t.im_end]
            n = len(ids)
            rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
            codes = torch.randint(0, cfg.code_predictor.codebook_size, (frames, cfg.num_code_groups), generator=g)
            samples.append(TalkerSample(input_ids=torch.tensor(ids, device=device), thinker_embeds=rand(n, ht),
                                        thinker_hidden=rand(n, ht), tts_embeds=rand(3, ht),
                                        codes=codes.to(device), speaker="ethan"))
        batches.append(samples)
    return batches


def layout_of(sample, cfg) -> dict:
    """sequence_layout's figures read off a built sample through the conditioning code (the smoke's check)."""
    from omni_train.models.talker.conditioning import PREFIX_LENGTH, context_index

    index, start, end = context_index(cfg, sample.input_ids)
    kept = sample.input_ids[index]
    t = cfg.text
    media = int(((kept == t.audio) | (kept == t.image) | (kept == t.video)).sum())
    frames = sample.codes.shape[0]
    return dict(length=len(index) + PREFIX_LENGTH + frames, frames=frames, media_rows=media,
                text_rows=len(index) - media + (end - start) + 3, targets=frames + 1, reply=end - start - 3)


def talker_flops(cfg, layouts: list, attention: str = "causal") -> dict:
    """Training FLOPs of one step over conversations ``layouts`` (sequence_layout dicts), by part (the
    module docstring derives each term). ``attention="full"``: core attention over the whole S x S square
    (what FlopCounterMode counts) instead of the causal half."""
    h, L, cp = cfg.hidden_size, cfg.num_layers, cfg.code_predictor
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim
    pairs = (lambda s: s * (s + 1)) if attention == "causal" else (lambda s: 2 * s * s)  # 2 x causal/full pairs
    per_position = (h * (2 * q + 2 * kv) + h * cfg.num_experts + 3 * h * cfg.router_topk * cfg.moe_ffn_hidden_size
                    + 3 * h * cfg.shared_expert_ffn_hidden_size + h)
    tokens, frames = sum(x["length"] for x in layouts), sum(x["frames"] for x in layouts)
    g, hc = cfg.num_code_groups, cp.hidden_size
    qc, kvc = cp.num_attention_heads * cp.head_dim, cp.num_query_groups * cp.head_dim
    ht, fp = cfg.thinker_hidden_size, cfg.projection_ffn_hidden_size
    out = dict(
        backbone_linear=6.0 * L * per_position * tokens,
        backbone_attention=6.0 * L * q * sum(pairs(x["length"]) for x in layouts),
        codec_head=6.0 * h * cfg.codec_vocab_size * sum(x["targets"] for x in layouts),
        projections=(4.0 * ht * fp + 6.0 * fp * h) * sum(x["text_rows"] + x["media_rows"] for x in layouts),
        predictor_linear=6.0 * cp.num_layers * g * (hc * (2 * qc + 2 * kvc) + 3 * hc * cp.ffn_hidden_size) * frames,
        predictor_attention=6.0 * cp.num_layers * qc * pairs(g) * frames,
        predictor_heads=6.0 * (g - 1) * hc * cp.codebook_size * frames,
    )
    out["total"] = sum(out.values())
    out.update(tokens=tokens, frames=frames)
    return out


# --------------------------------------------------------------------------------------------------
# The two sides (built in a worker process).


def init_world(device, seed: int) -> None:
    from omni_train.config.schema import ParallelConfig
    from omni_train.parallel.setup import init_parallel

    init_parallel(ParallelConfig(), device, seed)


def build_ours(cfg, device, dtype):
    from omni_train.config.schema import ParallelConfig
    from omni_train.models.talker.model import build_talker

    model = build_talker(cfg, ParallelConfig(), device=device, params_dtype=dtype).train()
    return model, lambda samples: model(samples), dict(experts="grouped (ours)", attention="SDPA (ours)")


def hf_talker(cfg, device, dtype, impl: str):
    """transformers' Talker of ``cfg``'s sizes, explicitly initialised (norms 1, biases 0, the rest N(0, std))."""
    import torch
    from transformers import Qwen3OmniMoeTalkerConfig
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeTalkerForConditionalGeneration

    from omni_train.models.talker.hf_config import hf_talker_config

    kwargs = hf_talker_config(cfg)
    kwargs["text_config"] = dict(kwargs["text_config"], use_cache=False, output_router_logits=False)
    torch.manual_seed(1234)
    with torch.device(device):
        model = Qwen3OmniMoeTalkerForConditionalGeneration._from_config(
            Qwen3OmniMoeTalkerConfig(**kwargs), dtype=dtype, attn_implementation="sdpa", experts_implementation=impl)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.normal_(0.0, cfg.init_std)
    return model.train()


class HFParts:
    """transformers' modules under the names ``conditioning.teacher_forced_sequence`` reads."""

    def __init__(self, hf):
        self.hf, self.text_projection, self.hidden_projection = hf, hf.text_projection, hf.hidden_projection
        self.code_predictor = self

    def codec_embed(self, ids):
        return self.hf.model.codec_embedding(ids)

    def residual_embeddings(self, codes):
        import torch

        table = self.hf.code_predictor.model.codec_embedding
        return torch.stack([table[j](codes[:, j]) for j in range(codes.shape[1])], dim=1)


def hf_losses(hf, cfg, samples, aux_coeff: float) -> dict:
    """Ours' teacher-forced loss on transformers' outputs: CE(codebook 0) + w x CE(codebooks 1..15) (+ aux)."""
    import torch
    import torch.nn.functional as F
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import load_balancing_loss_func

    from omni_train.models.talker.conditioning import IGNORE, teacher_forced_sequence

    built = [teacher_forced_sequence(HFParts(hf), cfg, s) for s in samples]
    longest = max(seq.shape[0] for seq, *_ in built)
    embeds = torch.stack([F.pad(seq, (0, 0, 0, longest - seq.shape[0])) for seq, *_ in built])
    targets = torch.stack([F.pad(t, (0, longest - t.shape[0]), value=IGNORE) for _, t, *_ in built])
    positions = torch.arange(longest, device=embeds.device).expand(3, len(samples), -1)  # = ours' plain positions
    out = hf.model(inputs_embeds=embeds, position_ids=positions, use_cache=False, output_router_logits=aux_coeff > 0)
    hidden, keep = out.last_hidden_state, targets != IGNORE
    codec0 = F.cross_entropy(hf.codec_head(hidden[keep]).float(), targets[keep])
    rows = torch.cat([torch.full_like(state, i) for i, (_, _, state, _) in enumerate(built)])
    states = hidden[rows, torch.cat([state for _, _, state, _ in built])]  # the state that predicted each C[k, 0]
    codes, groups, predictor = torch.cat([s.codes for s in samples]), cfg.num_code_groups, hf.code_predictor
    inputs = torch.cat([states[:, None], hf.model.codec_embedding(codes[:, :1]),
                        HFParts(hf).residual_embeddings(codes[:, 1:groups - 1])], dim=1)  # [N, G, H]
    h = predictor.model(inputs_embeds=inputs, use_cache=False).last_hidden_state
    logits = torch.stack([predictor.lm_head[j - 1](h[:, j]) for j in range(1, groups)], dim=1)  # [N, G-1, V]
    residual = F.cross_entropy(logits.flatten(0, 1).float(), codes[:, 1:].reshape(-1))
    loss = codec0 + cfg.residual_loss_weight * residual
    if aux_coeff > 0:
        loss = loss + aux_coeff * load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.router_topk)
    return dict(loss=loss, loss_codec0=codec0.detach(), loss_residual=residual.detach())


def build_transformers(cfg, device, dtype, impl: str):
    """transformers' Talker with experts ``impl`` if this transformers runs it (a forward + backward probe),
    else eager."""
    import torch

    for choice in dict.fromkeys([impl, "eager"]):
        try:
            model = hf_talker(cfg, device, dtype, choice)
            if choice != "eager":  # the impl may build and still fail at its first call on this device
                with torch.device(device):
                    x = torch.randn(1, 16, cfg.hidden_size, dtype=dtype, requires_grad=True)
                    model.model.layers[0].mlp(x).sum().backward()
                model.zero_grad(set_to_none=True)
            break
        except (ValueError, TypeError, ImportError, NotImplementedError, RuntimeError) as e:
            print(f"experts implementation {choice!r} unavailable ({type(e).__name__}: {str(e)[:200]})", flush=True)
    else:
        raise RuntimeError("transformers' Talker could not be built (see above)")
    info = dict(experts=model.config.text_config._experts_implementation,
                attention=model.config.text_config._attn_implementation)
    return model, lambda samples: hf_losses(model, cfg, samples, cfg.aux_loss_coeff), info


# --------------------------------------------------------------------------------------------------
# Worker side.


def _versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "megatron.core"):
        try:
            out[name] = __import__(name, fromlist=["_"]).__version__
        except ImportError:
            out[name] = None
    return out


def worker(side: str, spec: dict, result_path: Path) -> None:
    """Build one side, then warm-up and timed steps; the result file is rewritten after every step."""
    import torch

    from omni_train.metrics import peak_memory_gib

    on_gpu = torch.cuda.is_available()
    device, dtype = (torch.device("cuda", 0), torch.bfloat16) if on_gpu else (torch.device("cpu"), torch.float32)
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    cfg = talker_config(spec)
    if side == "ours":  # megatron's parallel_state (world size 1) and omni_train's library patches
        init_world(device, spec["seed"])
    start = time.perf_counter()
    model, forward, info = (build_ours(cfg, device, dtype) if side == "ours"
                            else build_transformers(cfg, device, dtype, spec["hf_experts"]))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY,
                                  fused=on_gpu, foreach=None if on_gpu else True)
    batches = make_batches(spec, cfg, device, dtype)
    result = dict(side=side, status="running", build_s=time.perf_counter() - start, **info,
                  optimizer="AdamW(fused)" if on_gpu else "AdamW(foreach)", parameters=sum(p.numel() for p in params),
                  step_times_s=[], losses=[], device=torch.cuda.get_device_name() if on_gpu else "cpu",
                  versions=_versions())
    print(f"[{side}] built in {result['build_s']:.1f}s: {info}, {result['parameters'] / 1e6:.1f}M parameters",
          flush=True)
    for i, samples in enumerate(batches):
        if i == spec["warmup"] and on_gpu:
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = forward(samples)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=True)
        optimizer.step()
        sync()
        result["step_times_s"].append(time.perf_counter() - t0)
        result["losses"].append([float(out[k].detach()) for k in ("loss", "loss_codec0", "loss_residual")])
        if i >= spec["warmup"]:
            result["peak_memory_gib"] = peak_memory_gib(device)
        result_path.write_text(json.dumps(result))
        print(f"[{side}] step {i + 1}: {result['step_times_s'][-1] * 1e3:.1f} ms, loss "
              f"{result['losses'][-1][0]:.4f} (codec0 {result['losses'][-1][1]:.4f}, residual "
              f"{result['losses'][-1][2]:.4f})", flush=True)
    result["status"] = "ok"
    result_path.write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------
# The smoke's checks (CPU, fp32, tiny): the same loss on both sides, and the FLOP formula.


def _grouped_mm_flops(a, b, *args, out_shape=None, **kwargs) -> int:
    """torch._grouped_mm (FlopCounterMode has no formula for it): 2 x MACs. 2-D x 2-D with offsets splits the
    contraction into groups ([K, M] x [M, N] -> [G, K, N]: 2 K M N); otherwise 2 x output size x a's last dim."""
    if len(a) == 2 and len(b) == 2:
        return 2 * a[0] * a[1] * b[1]
    size = 1
    for d in out_shape:
        size *= d
    return 2 * size * a[-1]


def _counted(run) -> dict:
    """FLOPs by op of ``run()`` under FlopCounterMode, with the CPU attention kernel and grouped GEMM added."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    mapping = {aten._grouped_mm: _grouped_mm_flops,
               aten._scaled_dot_product_flash_attention_for_cpu:
                   lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v),
               aten._scaled_dot_product_flash_attention_for_cpu_backward:
                   lambda go, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(go, q, k, v)}
    with fc.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        run()
    counts = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    attention = {k: v for k, v in counts.items() if "attention" in k}
    forward = sum(v for k, v in attention.items() if "backward" not in k)
    return dict(by_op=counts, matmul=sum(counts.values()) - sum(attention.values()), attention_forward=forward,
                attention_backward=sum(attention.values()) - forward)


def hf_to_disk_names(hf) -> dict:
    """transformers' in-memory Talker state -> the released on-disk names (``talker.`` prefix, one tensor per
    expert) that ``weights.hf_to_talker`` reads."""
    out = {}
    for name, tensor in hf.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base, ffn = name[:-len("gate_up_proj")], tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                out[f"talker.{base}{e}.gate_proj.weight"] = tensor[e, :ffn]
                out[f"talker.{base}{e}.up_proj.weight"] = tensor[e, ffn:]
        elif name.endswith("mlp.experts.down_proj"):
            for e in range(tensor.shape[0]):
                out[f"talker.{name[:-len('down_proj')]}{e}.down_proj.weight"] = tensor[e]
        else:
            out[f"talker.{name}"] = tensor
    return out


def check_worker(spec: dict, result_path: Path) -> None:
    """transformers' weights loaded into ours: both sides' loss parts on one batch (fp32), then FLOPs counted
    by torch against talker_flops, for one forward + backward of each side."""
    import torch

    from omni_train.models.talker.weights import hf_to_talker

    device, dtype = torch.device("cpu"), torch.float32
    cfg = talker_config(spec)
    init_world(device, spec["seed"])
    hf, forward_hf, info = build_transformers(cfg, device, dtype, spec["hf_experts"])
    ours, forward_ours, _ = build_ours(cfg, device, dtype)
    missing, unexpected = ours.load_state_dict(hf_to_talker(hf_to_disk_names(hf), cfg), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    samples = make_batches(spec, cfg, device, dtype)[0]
    layouts = [layout_of(s, cfg) for s in samples]
    drawn = [sequence_layout(c, k) for c, k in draw_lengths(spec)[0]]
    result = dict(layouts_match=layouts == drawn, hf=info)
    with torch.no_grad():
        a, b = forward_ours(samples), forward_hf(samples)
    result["loss_parts"] = {k: [float(a[k]), float(b[k]), abs(float(a[k]) - float(b[k]))]
                            for k in ("loss_codec0", "loss_residual")}
    causal, full = talker_flops(cfg, layouts), talker_flops(cfg, layouts, attention="full")
    attention = ("backbone_attention", "predictor_attention")
    formula = dict(causal_total=causal["total"], matmul=full["total"] - sum(full[k] for k in attention),
                   attention_forward_full=sum(full[k] for k in attention) / 3, by_part=causal)
    result["flops"] = dict(formula=formula)
    for side, fn in (("ours", forward_ours), ("transformers", forward_hf)):
        result["flops"][side] = _counted(lambda: fn(samples)["loss"].backward())
    result_path.write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------------
# Parent: the sides in subprocesses, then the figures.


def run_side(name: str, spec: dict, timeout: float, log_path: Path) -> dict:
    if timeout < 10:
        return dict(status="skipped (deadline)")
    print(f"== {name} (timeout {timeout:.0f}s, log {log_path})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--spec", json.dumps(spec),
               "--result", str(result_path)]
        env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
        start = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=REPO,
                                      env=env).returncode
                status = "ok" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                status = f"timeout ({timeout:.0f}s)"
        result = json.loads(result_path.read_text()) if result_path.exists() else {}
    result.update(status=status if status != "ok" else result.get("status", "?"), wall_s=time.perf_counter() - start)
    if status != "ok":
        result["log_tail"] = log_path.read_text(errors="replace").splitlines()[-15:]
        print(f"[{name}] {status}:", *result["log_tail"], sep="\n  ", flush=True)
    return result


def figures(result: dict, spec: dict, cfg, peak) -> dict:
    """Medians over the timed steps of each step's rates (each batch's own tokens, frames and FLOPs)."""
    times, lengths = result.get("step_times_s", []), draw_lengths(spec)
    timed = range(spec["warmup"], len(times))
    if not timed:
        return {}
    per = [talker_flops(cfg, [sequence_layout(c, k) for c, k in lengths[i]]) for i in timed]
    med = lambda xs: statistics.median(list(xs))  # noqa: E731
    step = [times[i] for i in timed]
    out = dict(steps_timed=len(step), step_s=med(step), tokens_per_s=med(f["tokens"] / t for f, t in zip(per, step)),
               frames_per_s=med(f["frames"] / t for f, t in zip(per, step)),
               tflops=med(f["total"] / t / 1e12 for f, t in zip(per, step)),
               flops_per_step=med(f["total"] for f in per))
    out["predictor_positions_per_s"] = out["frames_per_s"] * cfg.num_code_groups
    out["mfu"] = out["tflops"] * 1e12 / peak if peak else None
    return out


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def table(report: dict) -> str:
    head = ["side", "status", "experts", "step ms", "tokens/s", "frames/s", "predictor pos/s", "TFLOP/s", "MFU",
            "peak GiB", "loss first->last"]
    rows = []
    for side in SIDES:
        r = report["results"].get(side) or {}
        f, losses = r.get("figures") or {}, r.get("losses") or []
        step_ms = f["step_s"] * 1e3 if f.get("step_s") else None
        rows.append([side, r.get("status", "-"), r.get("experts", "-"), _fmt(step_ms, ".1f"),
                     _fmt(f.get("tokens_per_s"), ",.0f"), _fmt(f.get("frames_per_s"), ",.0f"),
                     _fmt(f.get("predictor_positions_per_s"), ",.0f"), _fmt(f.get("tflops"), ".2f"),
                     "-" if f.get("mfu") is None else f"{100 * f['mfu']:.2f}%", _fmt(r.get("peak_memory_gib"), ".2f"),
                     f"{losses[0][0]:.3f}->{losses[-1][0]:.3f}" if losses else "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |" for row in [head] + rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def check_lines(check: dict) -> list:
    if not check.get("loss_parts"):
        return [f"check: {check.get('status')}"]
    out = [f"check: layouts from the built samples equal the drawn ones: {check['layouts_match']}; transformers "
           f"{check['hf']}"]
    for k, (a, b, d) in check["loss_parts"].items():
        out.append(f"check: {k} ours {a:.6f} transformers {b:.6f} |diff| {d:.2e} (same weights, fp32)")
    f = check["flops"]["formula"]
    out.append("check: formula by part (causal) " + ", ".join(f"{k} {v:.4g}" for k, v in f["by_part"].items()))
    for side in SIDES:
        c = check["flops"].get(side, {})
        out.append(f"check: FlopCounterMode {side}: matmuls {c['matmul']:.6g} vs formula {f['matmul']:.6g} "
                   f"(ratio {c['matmul'] / f['matmul']:.6f}); attention forward {c['attention_forward']:.6g} vs "
                   f"formula (full square) {f['attention_forward_full']:.6g} (ratio "
                   f"{c['attention_forward'] / f['attention_forward_full']:.6f}), counted backward = "
                   f"{c['attention_backward'] / max(1, c['attention_forward']):.2f} x forward (torch counts the "
                   f"score recompute); ops {c['by_op']}")
    return out


def run_all(args) -> dict:
    import torch

    from omni_train.metrics import device_peak_flops

    spec = dict(smoke=args.smoke, layers=args.layers, seq_length=args.seq_length, context=args.context,
                micro_batch=args.micro_batch, steps=args.steps, warmup=args.warmup, seed=args.seed,
                aux_loss_coeff=args.aux_loss_coeff, hf_experts=args.hf_experts)
    cfg = talker_config(spec)
    peak = device_peak_flops() if torch.cuda.is_available() else None
    first = [sequence_layout(c, k) for c, k in draw_lengths(spec)[0]]
    report = dict(date=time.strftime("%Y-%m-%d"), spec=spec, peak_flops=peak, versions=_versions(),
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  model=dict(layers=cfg.num_layers, hidden=cfg.hidden_size, experts=cfg.num_experts,
                             topk=cfg.router_topk, predictor_layers=cfg.code_predictor.num_layers,
                             code_groups=cfg.num_code_groups),
                  first_batch=dict(layouts=first, flops=talker_flops(cfg, first)), results={})
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="talker_throughput_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    parts = (["check"] if args.smoke else []) + [s for s in SIDES if s in args.which]
    for name in parts:
        left = args.deadline - (time.perf_counter() - start)
        r = run_side(name, spec, min(args.timeouts.get(name, TIMEOUTS[name]), left), log_dir / f"{name}.log")
        if name == "check":
            report["check"] = r
            continue
        r["figures"] = figures(r, spec, cfg, peak)
        report["results"][name] = r
    a, b = ((report["results"].get(s) or {}).get("figures", {}).get("tokens_per_s") for s in SIDES)
    report["ratio"] = a / b if a and b else None
    return report


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU check of the logic: " + json.dumps(SMOKE))
    p.add_argument("--layers", type=int, default=4, help="backbone layers (the release has 20)")
    p.add_argument("--seq-length", type=int, default=1800, help="backbone positions per conversation: context + frames")
    p.add_argument("--context", default="200-400", help="context positions per conversation, drawn in LOW-HIGH")
    p.add_argument("--micro-batch", type=int, default=4, help="conversations per step (one optimizer step each)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--aux-loss-coeff", type=float, default=1e-3, help="MoE load-balancing loss weight (release 1e-3)")
    p.add_argument("--hf-experts", default="grouped_mm", help="transformers' experts implementation")
    p.add_argument("--which", default=",".join(SIDES), type=lambda s: [v for v in s.split(",") if v])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeouts", default="", type=lambda s: {k: float(v) for k, v in
                                                           (i.split("=") for i in s.split(",") if i)},
                   help=f"per side, e.g. ours=300 (default {TIMEOUTS})")
    p.add_argument("--deadline", type=float, default=450, help="seconds for all sides together")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--log-dir", default=None, help="one log per side (default: a temp dir)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:  # the smoke sizes, unless given on the command line
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for key, value in SMOKE.items():
            if key not in given:
                setattr(args, key, value)
    return args


def main(argv=None) -> int:
    from omni_train.compat import quiet_library_warnings

    quiet_library_warnings()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        spec = json.loads(args.spec)
        (check_worker(spec, Path(args.result)) if args.worker == "check"
         else worker(args.worker, spec, Path(args.result)))
        return 0
    report = run_all(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    fb = report["first_batch"]
    print(f"model {report['model']}; device {report['device']}; {report['versions']}")
    print(f"batch 1: {len(fb['layouts'])} conversations, {fb['flops']['tokens']} backbone positions, "
          f"{fb['flops']['frames']} frames; training FLOPs {fb['flops']['total'] / 1e12:.3f} T ("
          + ", ".join(f"{k} {fb['flops'][k] / fb['flops']['total']:.1%}" for k in fb["flops"]
                      if k not in ("total", "tokens", "frames")) + ")")
    if "check" in report:
        print("\n".join(check_lines(report["check"])))
    print(table(report))
    if report["ratio"]:
        print(f"tokens/s ratio ours / transformers: {report['ratio']:.2f}")
    return 0 if all(r.get("status") == "ok" for r in report["results"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
