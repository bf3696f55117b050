"""Measured vs estimated per-rank memory of one multimodal Thinker training step, on one GPU.

    python3 benchmarks/memory_probe.py [overrides...] --media audio|image [--out results.json]

Builds the model as the multimodal stages do (towers + megatron LM, the stage's trainable set, megatron
DDP with fp32 grad buffers, the distributed optimizer), runs two optimizer steps on one micro-batch whose
tokens are (almost) all audio or all image placeholders (the estimate's worst case) with a packed-document
mask, and prints the second step's measured memory next to omni_train/planning/memory_estimate.py's
figures for the same config at world size 1. Use it with a reduced depth (model.thinker.num_layers) so that one
GPU holds the model; the per-layer and per-token terms are the same as at full depth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from omegaconf import OmegaConf

GB = 1e9
PLACEHOLDERS = ("audio_pad", "image_pad", "video_pad", "vision_start", "audio_start")


def _token_ids(vocab_size: int) -> dict:
    """Placeholder ids at the top of the vocabulary (any ids the text never uses work)."""
    return {name: vocab_size - 1 - i for i, name in enumerate(PLACEHOLDERS)}


def _audio_batch(cfg, tokens: int, device, ids: dict):
    """One audio whose encoder output fills ``tokens - 1`` placeholders (13 tokens per 100 frames)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    chunks = (tokens - 1) // 13
    frames = chunks * 2 * cfg.model.thinker.audio_tower.n_window
    n = int(_get_feat_extract_output_lengths(torch.tensor(frames)))
    features = torch.randn(1, cfg.model.thinker.audio_tower.num_mel_bins, frames, device=device)
    mask = torch.ones(1, frames, dtype=torch.long, device=device)
    return n, ids["audio_pad"], dict(input_features=features, feature_attention_mask=mask)


def _image_batch(cfg, tokens: int, device, ids: dict):
    """One image of (tokens // 64) x 64 merged patches (each 2x2 patches of 16x16, two frames)."""
    v = cfg.model.thinker.vision_tower
    merge = v.spatial_merge_size
    rows, cols = (tokens - 1) // 64, 64
    grid = torch.tensor([[1, rows * merge, cols * merge]], device=device)
    patches = rows * cols * merge * merge
    pixels = torch.randn(patches, 3 * v.temporal_patch_size * v.patch_size**2, device=device)
    return rows * cols, ids["image_pad"], dict(pixel_values=pixels, image_grid_thw=grid)


def _batch(cfg, media: str, device):
    seq, b = cfg.trainer.seq_length, cfg.trainer.micro_batch_size
    assert b == 1, "the probe builds one sequence per micro-batch"
    placeholders = _token_ids(cfg.model.thinker.vocab_size)
    n, token, inputs = (_audio_batch if media == "audio" else _image_batch)(cfg, seq, device, placeholders)
    ids = torch.randint(0, cfg.model.thinker.vocab_size - len(PLACEHOLDERS), (1, seq), device=device)
    ids[0, 1:1 + n] = token
    positions = torch.arange(seq, device=device).view(1, 1, seq).expand(3, 1, seq).contiguous()
    documents = torch.zeros(1, seq, dtype=torch.long, device=device)
    documents[0, seq // 2:] = 1  # two packed documents, as the packer writes them
    packed = dict(document_ids=documents, max_seqlen=seq - seq // 2,
                  cu_seqlens=torch.tensor([0, seq // 2, seq], dtype=torch.int32, device=device))
    return n, ids, positions, packed, inputs


def _phase_stage(stage, phase_name):
    from omni_train.config.schema import StageConfig

    if not stage.phases:
        return stage
    phase = next(p for p in stage.phases if p.name == phase_name) if phase_name else stage.phases[-1]
    return StageConfig(name=stage.name, trainable=list(phase.trainable), frozen=list(phase.frozen))


def measure(overrides, media: str, phase: str | None, attention: str = "packed") -> dict:
    """``attention``: "packed" (the documents' boundaries, as shard batches reach the model at cp=1) or
    "mask" (the dense [S, S] document mask, as under context parallelism)."""
    from omni_train.config import compose
    from omni_train.models.common.attention import document_attention, document_attention_mask
    from omni_train.planning.memory_estimate import estimate_memory
    from omni_train.models.thinker.omni import build_omni_thinker
    from omni_train.parallel.setup import init_parallel
    from omni_train.parallel.wrap import build_optimizer, wrap_data_parallel
    from omni_train.stages import apply_trainable
    from omni_train.models.thinker.hf_config import hf_thinker_config

    cfg = OmegaConf.to_object(compose(list(overrides)))
    on_gpu = torch.cuda.is_available()  # the CPU path only checks that the probe runs
    device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    init_parallel(cfg.parallel, device, seed=0)
    stage = _phase_stage(cfg.stage, phase)
    model = build_omni_thinker(hf_thinker_config(cfg.model.thinker, _token_ids(cfg.model.thinker.vocab_size)), cfg.model.thinker, cfg.parallel, device=device,
                               params_dtype=dtype, recompute=cfg.trainer.recompute)
    counts = apply_trainable(model, stage.trainable, stage.frozen)
    ddp = wrap_data_parallel(model, cfg.parallel, on_gpu=on_gpu)
    optimizer = build_optimizer(cfg.optim, ddp, cfg.parallel, bf16=on_gpu, on_gpu=on_gpu)
    memory = torch.cuda if on_gpu else None
    n, ids, positions, packed, inputs = _batch(cfg, media, device)
    labels = torch.roll(ids, -1, dims=1)
    record = {}
    for step in (1, 2):
        if memory:
            memory.synchronize()
            memory.reset_peak_memory_stats()
        before = memory.memory_allocated() if memory else 0
        start = time.perf_counter()
        attend = (document_attention(packed) if attention == "packed"
                  else {"attention_mask": document_attention_mask(packed["document_ids"])})
        loss = ddp(ids, positions, labels=labels, **attend, **inputs).float().mean()
        after_forward = memory.memory_allocated() if memory else 0
        loss.backward()
        del attend, loss
        ddp.finish_grad_sync()
        optimizer.step()
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        record = dict(step=step, seconds=time.perf_counter() - start)
        if memory:
            memory.synchronize()
            record.update(states_gb=before / GB, kept_after_forward_gb=(after_forward - before) / GB,
                          peak_gb=memory.max_memory_allocated() / GB,
                          reserved_gb=memory.max_memory_reserved() / GB)
    estimate = estimate_memory(cfg.model.thinker, cfg.parallel, cfg.trainer, stage, world_size=1,
                               document_mask=attention == "mask",
                               master_weights=cfg.optim.master_weights)[0]
    items = {item.label: item.bytes / GB for item in estimate.items}
    states = sum(items[k] for k in ("parameters", "gradients", "optimizer"))
    return dict(overrides=list(overrides), media=media, media_tokens=n, phase=phase, attention=attention,
                trainable=counts,
                measured=record, estimate_total_gb=estimate.total / GB, estimate_states_gb=states,
                estimate_items_gb=items)


def sdpa_backends(seq: int = 8192) -> dict:
    """Which SDPA kernels take the multimodal path's call: GQA 32/4 x 128, bf16, a boolean [1,1,S,S] mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    device = torch.device("cuda", 0)
    q = torch.randn(1, 32, seq, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 4, seq, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 4, seq, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None, None]
    out = {}
    for backend in (None, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        name = "default" if backend is None else backend.name
        try:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            if backend is None:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            else:
                with sdpa_kernel([backend]):
                    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
            kept = torch.cuda.memory_allocated() - before
            o.sum().backward()
            out[name] = dict(ok=True, grad_fn=type(o.grad_fn).__name__, kept_gb=kept / GB,
                             peak_gb=(torch.cuda.max_memory_allocated() - before) / GB)
            del o
        except RuntimeError as exc:
            out[name] = dict(ok=False, error=str(exc).splitlines()[0][:160])
        q.grad = k.grad = v.grad = None
    return out


def main(argv) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--media", choices=("audio", "image"), default="audio")
    parser.add_argument("--phase", default=None, help="a phase of the stage (default: the last)")
    parser.add_argument("--sdpa", action="store_true", help="only report which SDPA kernels take a mask")
    parser.add_argument("--attention", choices=("packed", "mask"), default="packed",
                        help="packed documents by their boundaries (cp=1, as shard batches) or the dense mask")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.sdpa:
        result = sdpa_backends()
    else:
        import logging
        import warnings

        logging.getLogger("megatron").setLevel(logging.WARNING)
        warnings.filterwarnings("ignore")
        result = measure(args.overrides, args.media, args.phase, args.attention)
    text = json.dumps(result, indent=1)
    print(text, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
