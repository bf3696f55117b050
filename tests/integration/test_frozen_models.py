"""Several models in one process: a policy trains beside a frozen reference of the same tiny MoE model.

The reference runs a forward every micro-batch (as a KL or DPO term would), with the aux loss on. It must
stay bit-identical, hold no gradient and no optimizer state, leave megatron's process-wide MoE state and
the RNGs alone, and the policy must train exactly as it does with no reference in the process. Its loss
reaches the log through the generic loss report, which the loop knows nothing about.
"""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from omni_train.config import compose
from omni_train.loops.supervised import SupervisedLoop
from omni_train.models.common.attention import document_attention
from omni_train.parallel.setup import init_parallel, shutdown_parallel
from omni_train.session import Session

STEPS = 3


def _config(run_dir, *extra):
    return OmegaConf.to_object(compose([
        "recipe=tiny/text_pretrain", f"run_dir={run_dir}", f"trainer.max_steps={STEPS}", "optim.warmup_steps=1",
        "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.seq_length=64",
        "model.thinker.aux_loss_coeff=0.01", "checkpoint.save_every=100", *extra]))


def _with_reference_term(stage):
    """The stage's forward plus the reference's own loss on the same batch, reported as
    ``loss_reference`` (sum, count): a term that touches the frozen model each micro-batch."""
    def forward(model, batch, frozen):
        output, loss_func = stage.forward(model, batch, frozen)
        reference = frozen["reference"](batch["input_ids"], batch["position_ids"], labels=batch["labels"],
                                        **document_attention(batch))
        assert not reference.requires_grad

        def loss(out):
            loss_sum, tokens, report = loss_func(out)
            mask = batch["loss_mask"].float()
            report["loss_reference"] = torch.stack([(reference.float() * mask).sum(), mask.sum()])
            return loss_sum, tokens, report

        return output, loss

    return dataclasses.replace(stage, forward=forward)


def _run(cfg, with_reference: bool):
    env = init_parallel(cfg.parallel, torch.device("cpu"), cfg.trainer.seed)
    try:
        session = Session(cfg, env, resolved={})
        if with_reference:
            session.stage = _with_reference_term(session.stage)
        loop = SupervisedLoop(session)
        reference = session.frozen.get("reference")
        before = ({n: p.detach().clone() for n, p in reference.named_parameters()} if reference else None)
        values = [loop.train_step() for _ in range(STEPS)]
        return session, loop, reference, before, values
    finally:
        shutdown_parallel()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("frozen")
    alone = _run(_config(root / "alone"), with_reference=False)
    paired = _run(_config(root / "paired", "stage.frozen_models=[{name: reference, source: init}]"),
                  with_reference=True)
    return alone, paired


def test_policy_trains_as_without_the_reference(runs):
    (_, _, _, _, alone), (_, _, _, _, paired) = runs
    assert [v["loss"] for v in paired] == [v["loss"] for v in alone]
    assert [v["grad_norm"] for v in paired] == [v["grad_norm"] for v in alone]
    assert alone[-1]["loss"] < alone[0]["loss"]


def test_reference_is_frozen_and_outside_the_optimizer(runs):
    _, (session, loop, reference, before, values) = runs
    after = dict(reference.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(after[n], before[n]) for n in before)  # bit-identical after 3 updates
    assert not reference.training and not reference.module.training
    assert all(not p.requires_grad and p.grad is None and getattr(p, "main_grad", None) is None
               for p in after.values())
    optimized = {id(p) for opt in getattr(loop.optimizer, "chained_optimizers", [loop.optimizer])
                 for group in opt.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in after.values()}
    assert optimized  # the policy's parameters are there
    # the policy moved; the reference started from the same weights (source: init)
    policy = dict(loop.model.module.named_parameters())
    assert any(not torch.equal(policy[n], before[f"module.{n}"]) for n in policy)


def test_reference_loss_reaches_the_log_through_the_report(runs):
    _, (_, _, _, _, values) = runs
    # step 1: the policy has not moved yet, so the reference's loss is the policy's
    assert values[0]["loss_reference"] == pytest.approx(values[0]["loss"], rel=1e-6)
    assert values[-1]["loss_reference"] > values[-1]["loss"]  # the policy improved, the reference did not
    assert values[0]["loss_reference_count"] == 4 * 64  # every target token of the global batch


def test_frozen_model_names_are_checked_before_building(tmp_path):
    from omni_train.config import ConfigError
    from omni_train.loops import check_stage

    cfg = compose(["recipe=tiny/text_pretrain", f"run_dir={tmp_path}",
                   "stage.frozen_models=[{name: ref, source: init}, {name: ref, source: 'stage:x'}]"])
    with pytest.raises(ConfigError, match=r"stage.frozen_models\[0\].name: 'ref' names two frozen models"):
        check_stage(cfg)
    cfg = compose(["recipe=tiny/text_pretrain", "stage.loop=async"])
    with pytest.raises(ConfigError, match="stage.loop: unknown loop 'async'; known: supervised, rollout"):
        check_stage(cfg)
    cfg = compose(["recipe=tiny/text_pretrain", "stage.loop=rollout"])  # a stage that learns from data
    with pytest.raises(ConfigError, match="stage.loop: stage 'text_pretrain' runs under loop supervised"):
        check_stage(cfg)


def test_teacher_from_another_stage_is_saved_only_when_asked(tmp_path):
    """A frozen model from another stage's final checkpoint (``stage:<name>``) holds that stage's trained
    weights; with ``save: true`` it enters this stage's checkpoints and a resumed run restores it."""
    first = _config(tmp_path / "first", "trainer.max_steps=2")
    env = init_parallel(first.parallel, torch.device("cpu"), first.trainer.seed)
    try:
        loop = SupervisedLoop(Session(first, env, resolved={}))
        loop.fit()
        trained = {n: p.detach().clone() for n, p in loop.model.module.named_parameters()}
        for save in (False, True):
            run_dir = tmp_path / f"second_{save}"
            spec = f"stage.frozen_models=[{{name: teacher, source: 'stage:first', save: {str(save).lower()}}}]"
            session = Session(_config(run_dir, "trainer.max_steps=2", spec), env, resolved={})
            teacher = dict(session.frozen["teacher"].module.named_parameters())
            assert all(torch.equal(teacher[n], trained[n]) for n in trained)
            SupervisedLoop(session).train_step()
            session.save()
            keys = _tensor_keys(run_dir / "checkpoints" / "step_00000001")
            assert any(k.startswith("frozen.teacher.") for k in keys) == save
            if save:  # resume: the teacher comes back from this stage's own checkpoint
                with torch.no_grad():
                    for p in session.frozen["teacher"].parameters():
                        p.zero_()
                resumed = Session(_config(run_dir, "trainer.max_steps=2", spec), env, resolved={})
                again = dict(resumed.frozen["teacher"].module.named_parameters())
                assert all(torch.equal(again[n], trained[n]) for n in trained)
    finally:
        shutdown_parallel()


def _tensor_keys(checkpoint):
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata)


def test_teacher_from_a_hugging_face_directory_equals_transformers(tmp_path):
    """``source: hf:<dir>``: a Qwen3-MoE teacher imported in memory gives transformers' logits."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=1024, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                            num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False,
                            rope_parameters=dict(rope_type="default", rope_theta=10000.0))
    torch.manual_seed(0)
    reference = Qwen3MoeForCausalLM(config).eval()
    with torch.no_grad():
        for p in reference.parameters():
            p.normal_(0, 0.05)
    reference.save_pretrained(tmp_path / "teacher")
    cfg = _config(tmp_path / "run", f"stage.frozen_models=[{{name: teacher, source: 'hf:{tmp_path / 'teacher'}'}}]")
    env = init_parallel(cfg.parallel, torch.device("cpu"), cfg.trainer.seed)
    try:
        teacher = Session(cfg, env, resolved={}).frozen["teacher"]
        ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(1))
        positions = torch.arange(24).expand(3, 2, 24)
        ours = teacher(ids, positions, attention_mask=None)
        with torch.no_grad():
            theirs = reference(ids).logits
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() < 1e-5
    finally:
        shutdown_parallel()
