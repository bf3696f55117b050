"""parallel.update (token scaling and clipping folded into fused AdamW's grad_scale) against megatron's own
step: finalize_model_grads' scaling, its grad norm, its clipping, then AdamW."""

import pytest
import torch
from megatron.core.distributed import finalize_model_grads

from omni_train.config.schema import ThinkerConfig, OptimConfig, ParallelConfig
from omni_train.models.thinker.lm import build_thinker_lm
from omni_train.parallel import adamw
from omni_train.parallel.update import GradScaling, apply_update, finalize_grads, grad_norm
from omni_train.parallel.wrap import build_optimizer, wrap_data_parallel

TINY = ThinkerConfig(
    vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=4,
    num_query_groups=2, head_dim=16, num_experts=4, router_topk=2, moe_ffn_hidden_size=32,
    mrope_section=[4, 2, 2],
)


def _train(dtype, clip_grad: float, ours: bool, steps: int = 3, kernel: str = "compiled"):
    torch.manual_seed(0)
    model = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=dtype)
    bf16 = dtype == torch.bfloat16
    ddp = wrap_data_parallel(model, ParallelConfig(), on_gpu=False, fp32_grads=not bf16)
    # eps comparable to the grads: AdamW's update then depends on the grads' scale (token count, clipping)
    cfg = OptimConfig(lr=1e-2, clip_grad=clip_grad, master_weights=not bf16, weight_decay=0.1, eps=1e-4,
                      kernel=kernel)
    optimizer = build_optimizer(cfg, ddp, ParallelConfig(), bf16=bf16, on_gpu=False)
    scaling = GradScaling()
    norms = []
    for step in range(steps):
        tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(step))
        positions = torch.arange(16).expand(3, 2, 16)
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = ddp(tokens, positions, None, labels=tokens.roll(-1, dims=1))
        mask = torch.ones_like(loss)
        mask[:, -3:] = 0
        (loss * mask).sum().backward()
        count = torch.tensor(int(mask.sum()), dtype=torch.int)
        if ours:
            finalize_grads([ddp], count, pending=scaling)
            assert float(scaling.tokens) == 26
            assert not optimizer.prepare_grads()
            norm = grad_norm(optimizer, scaling)
            apply_update(optimizer, norm, scaling, clip_grad)
            norms.append(float(norm))
        else:
            finalize_model_grads([ddp], count)
            _, norm, _ = optimizer.step()
            norms.append(norm)
    return norms, {n: p.detach().float().clone() for n, p in model.named_parameters()}


def _initial(dtype):
    torch.manual_seed(0)
    model = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=dtype)
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kernel", ["compiled", "torch_fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("clip_grad", [0.05, 1e9])  # clipping active in every step; never
def test_update_equals_megatrons_step(megatron_world1, dtype, clip_grad, kernel, monkeypatch):
    """The reference: megatron's step (grads scaled by finalize_model_grads, its norm, its clipping
    multiply, then torch's fused AdamW). AdamW's eps is set near the grads' size, so that the parameters
    depend on the gradient's scale: a wrong token division or clip coefficient shows in them."""
    # every tiny parameter through adamw_update, and through square_sum for the norm
    monkeypatch.setattr(adamw, "COMPILED_MIN_NUMEL", 0)
    ours_norms, ours = _train(dtype, clip_grad, ours=True, kernel=kernel)
    ref_norms, ref = _train(dtype, clip_grad, ours=False, kernel="torch_fused")
    if clip_grad < 1:
        assert min(ref_norms) > clip_grad  # the test exercises clipping
    initial = _initial(dtype)
    if dtype == torch.float32:
        assert ours_norms == pytest.approx(ref_norms, rel=1e-5)
        for name in ref:
            torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    else:
        # bf16 grads: ours rounds grad / divisor once (inside AdamW), megatron twice (two multiplies), and
        # Adam's m / sqrt(v) amplifies that on near-zero grads; the updates agree to ~1% on average
        assert ours_norms == pytest.approx(ref_norms, rel=1e-3)
        for name in ref:  # parameters ~1 (norm weights) differ by single bf16 ulps (0.0078) here and there
            moved = (ref[name] - initial[name]).abs().mean()
            assert (ours[name] - ref[name]).abs().mean() <= 0.1 * moved, name
    assert sum(not torch.equal(ours[n], initial[n]) for n in ref) > len(ref) // 2  # it trained


def test_grad_norm_non_finite_stands_for_the_gradients(megatron_world1):
    """A NaN in one gradient makes the norm NaN (what NonFiniteGuard reads instead of scanning buffers)."""
    torch.manual_seed(0)
    model = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    ddp = wrap_data_parallel(model, ParallelConfig(), on_gpu=False)
    optimizer = build_optimizer(OptimConfig(), ddp, ParallelConfig(), bf16=False, on_gpu=False)
    ddp.zero_grad_buffer()
    ddp.finish_grad_sync()  # no backward: every main grad is zero
    model.decoder.layers[1].mlp.router.weight.main_grad[0, 0] = float("nan")
    optimizer.prepare_grads()
    assert torch.isnan(grad_norm(optimizer, GradScaling(tokens=4.0)))
    model.decoder.layers[1].mlp.router.weight.main_grad[0, 0] = 3.0
    model.embedding.word_embeddings.weight.main_grad[1, 1] = 4.0
    assert float(grad_norm(optimizer, GradScaling(tokens=2.0))) == pytest.approx(2.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_decided_on_the_device_leaves_everything_untouched(megatron_world1, dtype):
    """apply_update(skip=1) (fused AdamW's found_inf): parameters, moments and step counts stay as they
    were; skip=0 steps."""
    torch.manual_seed(0)
    model = build_thinker_lm(TINY, ParallelConfig(), device="cpu", params_dtype=dtype)
    bf16 = dtype == torch.bfloat16
    ddp = wrap_data_parallel(model, ParallelConfig(), on_gpu=False, fp32_grads=not bf16)
    optimizer = build_optimizer(OptimConfig(master_weights=not bf16), ddp, ParallelConfig(), bf16=bf16,
                                on_gpu=False)
    tokens = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    scaling = GradScaling()

    def step(skip: float):
        ddp.zero_grad_buffer()
        ddp(tokens, torch.arange(16).expand(3, 2, 16), None, labels=tokens).sum().backward()
        finalize_grads([ddp], torch.tensor(32, dtype=torch.int), pending=scaling)
        optimizer.prepare_grads()
        apply_update(optimizer, grad_norm(optimizer, scaling), scaling, 1.0, skip=torch.tensor(skip))

    def snapshot():
        inner = next(iter(optimizer.chained_optimizers)).optimizer
        states = [{k: v.clone() for k, v in inner.state[p].items()} for p in inner.param_groups[0]["params"]]
        return {n: p.detach().clone() for n, p in model.named_parameters()}, states

    step(0.0)
    params, states = snapshot()
    step(1.0)
    params_after, states_after = snapshot()
    assert all(torch.equal(params[n], params_after[n]) for n in params)
    for before, after in zip(states, states_after):
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    step(0.0)
    params_after, states_after = snapshot()
    assert not any(torch.equal(params[n], params_after[n]) for n in params if "norm" not in n)
    assert float(states_after[0]["step"]) == float(states[0]["step"]) + 1


def test_square_sum_compiled_equals_eager(inductor_cpu):
    """The norm's reduction as CUDA runs it (compiled; inductor's CPU backend here) against eager fp64."""
    from omni_train.kernels.compiled import compiled
    from omni_train.parallel.update import square_sum

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for numel in (1000, 100_003):
            x = torch.randn(numel, generator=g).to(dtype)
            expected = x.double().square().sum()
            assert float(compiled(square_sum, True, True)(x)) == pytest.approx(float(expected), rel=1e-5)
