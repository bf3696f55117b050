"""The code predictor (the report's MTP module): a small dense transformer that turns the backbone's state
and a frame's codebook-0 code into the frame's residual codes 1 .. G-1.

Plain torch, replicated on every rank (5 layers, 142M parameters at release size): it is dense and small,
and every rank that holds the backbone's final hidden states runs it on its own frames. Module names are
transformers' (``layers.N.self_attn.q_proj`` ...) so that ``weights.py``'s table for it is a rename.

One frame is a sequence of G positions (transformers' ``generate`` feeds it the same way, one position per
step with a KV cache):

    position   0        1            2                  ...  G-1
    input      h        emb(c0)      codec_embedding[0](c1)  ...  codec_embedding[G-3](c_{G-2})
    output     -        c1 via       c2 via lm_head[1]  ...  c_{G-1} via lm_head[G-2]
                        lm_head[0]

``h`` is the backbone's final (normed) hidden state at the position that predicted c0, ``emb`` the
backbone's codec embedding. Causal attention, 1-D RoPE over positions 0 .. G-1, q/k RMSNorm, SwiGLU MLP.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omni_train.models.talker.config import CodePredictorConfig


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.heads, self.groups, self.head_dim = cfg.num_attention_heads, cfg.num_query_groups, d
        self.q_proj = nn.Linear(h, self.heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.groups * d, bias=False)
        self.v_proj = nn.Linear(h, self.groups * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, h, bias=False)
        self.q_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [N, L, H], cos/sin [L, head_dim] -> [N, L, H]."""
        n, length, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(n, length, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(n, length, self.groups, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(n, length, self.groups, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(self.head_dim),
                                             enable_gqa=self.heads != self.groups)
        return self.o_proj(out.transpose(1, 2).reshape(n, length, -1))


class MLP(nn.Module):
    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, cfg: CodePredictorConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class CodePredictor(nn.Module):
    """``num_code_groups - 1`` residual codebooks: as many input embeddings (``codec_embedding``) and heads
    (``lm_head``), over ``codebook_size`` codes."""

    def __init__(self, cfg: CodePredictorConfig, num_code_groups: int, init_std: float = 0.02):
        super().__init__()
        self.num_residual = num_code_groups - 1
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.codec_embedding = nn.ModuleList(nn.Embedding(cfg.codebook_size, cfg.hidden_size)
                                             for _ in range(self.num_residual))
        self.lm_head = nn.ModuleList(nn.Linear(cfg.hidden_size, cfg.codebook_size, bias=False)
                                     for _ in range(self.num_residual))
        exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim
        self.register_buffer("inv_freq", 1.0 / (cfg.rope_theta ** exponents), persistent=False)
        _init_like_transformers(self, init_std)

    def rotary(self, length: int, dtype: torch.dtype):
        """cos, sin [length, head_dim] for positions 0 .. length-1 (fp32 angles, as transformers)."""
        positions = torch.arange(length, device=self.inv_freq.device, dtype=torch.float)
        freqs = positions[:, None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def hidden(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """[N, L, H] frame inputs -> final normed hidden states [N, L, H]."""
        cos, sin = self.rotary(inputs_embeds.shape[1], inputs_embeds.dtype)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def residual_embeddings(self, residual_codes: torch.Tensor) -> torch.Tensor:
        """codes of codebooks 1 .. k ([N, k], k <= G-1) -> [N, k, H], codebook j through codec_embedding[j-1]."""
        return torch.stack([self.codec_embedding[j](residual_codes[:, j]) for j in range(residual_codes.shape[1])],
                           dim=1)

    def frame_inputs(self, state: torch.Tensor, c0_embed: torch.Tensor, residual_codes: torch.Tensor):
        """[N, 2 + k, H]: the backbone state [N, H], emb(c0) [N, H], then codebooks 1 .. k ([N, k])."""
        parts = [state.unsqueeze(1), c0_embed.unsqueeze(1)]
        if residual_codes.shape[1]:
            parts.append(self.residual_embeddings(residual_codes).to(state.dtype))
        return torch.cat(parts, dim=1)

    def logits(self, state: torch.Tensor, c0_embed: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Teacher-forced residual logits [N, G-1, codebook_size]: output j (codebook j) through lm_head[j-1],
        given the frame's true codes [N, G] (codebooks 1 .. G-2 are inputs; codebook G-1 is only a target)."""
        hidden = self.hidden(self.frame_inputs(state, c0_embed, codes[:, 1:self.num_residual]))
        heads = torch.stack([head.weight for head in self.lm_head])  # [G-1, V, H]
        return torch.einsum("njh,jvh->njv", hidden[:, 1:], heads)


@torch.no_grad()
def _init_like_transformers(module: nn.Module, std: float) -> None:
    """transformers' initialisation: normal(0, std) weights, unit norms (only used when nothing is loaded)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            sub.weight.normal_(0.0, std)
