"""Aux-loss-free balancing: after a step, each expert's bias moves against its load (megatron's rule)."""

import torch
from megatron.core.distributed import finalize_model_grads
from megatron.core.transformer.moe.router import TopKRouter
from omegaconf import OmegaConf

from omni_train.config import compose
from omni_train.models.thinker.lm import build_thinker_lm
from omni_train.parallel.wrap import wrap_data_parallel


def test_expert_bias_moves_against_load(megatron_world1):
    cfg = OmegaConf.to_object(compose(["model.thinker.load_balancing=expert_bias"]))
    model = build_thinker_lm(cfg.model.thinker, cfg.parallel, device="cpu", params_dtype=torch.float32)
    ddp = wrap_data_parallel(model, cfg.parallel, on_gpu=False)
    routers = [m for m in model.modules() if isinstance(m, TopKRouter)]
    assert len(routers) == cfg.model.thinker.num_layers
    assert all(torch.count_nonzero(r.expert_bias) == 0 for r in routers)

    ids = torch.randint(0, cfg.model.thinker.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    ddp(ids, torch.arange(32).expand(4, 32), None, labels=ids).sum().backward()
    loads = [r.local_tokens_per_expert.clone() for r in routers]
    assert all(load.sum() == 4 * 32 * cfg.model.thinker.router_topk for load in loads)
    finalize_model_grads([ddp])

    rate = cfg.model.thinker.expert_bias_update_rate
    for router, load in zip(routers, loads):
        expected = torch.sign(load.mean() - load) * rate
        torch.testing.assert_close(router.expert_bias, expected)
        assert router.expert_bias[load.argmax()] < 0 < router.expert_bias[load.argmin()]
