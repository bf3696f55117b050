"""On a GPU: the LM's packed-document attention through torch's varlen flash attention
(``models.common.attention.causal_varlen_attention``) against SDPA with the document mask, at the 30B-A3B widths
(32 query / 4 KV heads, head dim 128), bf16, forward and gradients, and the time of both.

    python3 benchmarks/varlen_check.py [--rows 2] [--length 4096] [--documents 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    import torch.nn.functional as F

    from omni_train.models.common.attention import causal_varlen_attention, segment_attention_mask

    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--documents", type=int, default=8, help="random document cuts per row")
    args = p.parse_args()
    b, s, heads, groups, d = args.rows, args.length, 32, 4, 128
    g = torch.Generator().manual_seed(0)
    bounds = [0]
    for r in range(b):
        cuts = sorted(torch.randperm(s - 1, generator=g)[: args.documents - 1].add(1).tolist())
        bounds += [r * s + c for c in cuts] + [(r + 1) * s]
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    longest = int((cu[1:] - cu[:-1]).max())
    dev = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(b * s, heads, d, **dev, requires_grad=True)
    k = torch.randn(b * s, groups, d, **dev, requires_grad=True)
    v = torch.randn(b * s, groups, d, **dev, requires_grad=True)
    grad = torch.randn(b * s, heads, d, **dev)
    mask = segment_attention_mask(cu, b, s)  # True = not attended

    def varlen():
        return causal_varlen_attention(q, k, v, cu, longest, d ** -0.5)

    def masked():
        qb, kb, vb = (x.view(b, s, -1, d).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=~mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(b * s, heads, d)

    results = {}
    for name, fn in (("varlen", varlen), ("masked", masked)):
        out = fn()
        results[name] = (out, *torch.autograd.grad(out, (q, k, v), grad))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(2):
            torch.autograd.grad(fn(), (q, k, v), grad)
        torch.cuda.synchronize()
        start.record()
        for _ in range(5):
            torch.autograd.grad(fn(), (q, k, v), grad)
        end.record()
        torch.cuda.synchronize()
        print(f"{name}: forward + backward {start.elapsed_time(end) / 5:.3f} ms", flush=True)
    for label, a, ref in zip(("out", "dq", "dk", "dv"), results["varlen"], results["masked"]):
        rel = float((a.float() - ref.float()).norm() / ref.float().norm())
        print(f"{label}: max |diff| {float((a.float() - ref.float()).abs().max()):.4g}, relative {rel:.3g}")
        assert rel < 2e-2, (label, rel)
    print(f"rows {b} x {s}, {len(bounds) - 1} documents, longest {longest}: varlen == masked SDPA", flush=True)


if __name__ == "__main__":
    main()
