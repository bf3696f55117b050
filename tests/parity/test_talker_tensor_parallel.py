"""The Talker at tensor parallel 2 with sequence parallelism and at pipeline parallel 2 (two gloo processes
each, every rank given the same batch) trains as the single-process Talker: teacher-forced loss parts,
codebook-0 and residual logits, every parameter's gradient after megatron's reductions (tensor-parallel
shards gathered back to full shape, replicated ones equal on every rank; pipeline stages renumbered, the
tables both stages hold compared on both), then one AdamW step through the loop's update and the losses
again. The pipeline runs through megatron's schedule (get_forward_backward_func).

Two batches of two conversations (right padding inside the batch): one whose longest sequence is a whole
number of sequence-parallel chunks (everything exact, megatron's aux loss included) and one that is not
(the Talker pads one position, which megatron's router counts in its aux loss as it counts the batch's own
padding, so that batch runs without aux loss). Layouts the Talker does not support are refused by name.
"""

import dataclasses
import os
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from safetensors.torch import load_file

from omni_train.config.schema import OptimConfig, ParallelConfig, ThinkerConfig
from omni_train.models.talker import conditioning as cond
from omni_train.models.talker.config import talker_layout_problems
from omni_train.models.talker.model import build_talker
from omni_train.models.talker.thinker_signals import capture_thinker_signals
from omni_train.models.talker.weights import hf_to_talker
from omni_train.models.thinker.bridge import Row, tp_slice, tp_unslice
from omni_train.models.thinker.lm import build_thinker_lm
from omni_train.parallel.process_state import reset_moe_aux_state
from omni_train.parallel.update import GradScaling, apply_update, finalize_grads, grad_norm
from omni_train.parallel.wrap import build_optimizer, wrap_data_parallel
from tests.conftest import free_port
from tests.parity.test_talker_vs_transformers import THINKER_HIDDEN, conversation, tiny_omni, toy_config

TP = PP = 2
LAYOUT = ParallelConfig(tp=TP, sequence_parallel=True)
MAX_DIFF = 1e-5
OPTIM = OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, clip_grad=1.0)
GATED, COPY = Row("", (), "gated_mlp", ()), Row("", (), "copy", ())  # bridge.tp_slice kinds
ROWS = ("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")  # split along dim 0
COLUMNS = ("linear_proj.weight", "linear_fc2.weight")  # split along dim 1


def context_length(cfg, ids) -> int:
    return len(cond.context_index(cfg, ids)[0]) + cond.PREFIX_LENGTH


def batch(cfg, odd: bool):
    """Two conversations of different lengths; the longer is an odd number of positions iff ``odd``."""
    parts = []
    for seed, reply in ((1, 6), (2, 3)):
        gen = torch.Generator().manual_seed(seed)
        ids = conversation(gen, reply=reply)
        embeds = torch.randn(len(ids), THINKER_HIDDEN, generator=gen)
        parts.append((gen, ids, embeds, torch.randn(embeds.shape, generator=gen),
                      torch.randn(3, THINKER_HIDDEN, generator=gen)))
    frames = [6, 3]
    lengths = [context_length(cfg, ids) + k for (_, ids, *_), k in zip(parts, frames)]
    longest = lengths.index(max(lengths))
    frames[longest] += (lengths[longest] % 2) != odd
    samples = []
    for (gen, ids, embeds, hidden, tts), k in zip(parts, frames):
        codes = torch.randint(0, cfg.code_predictor.codebook_size, (k, cfg.num_code_groups), generator=gen)
        samples.append(cond.TalkerSample(ids, embeds, hidden, tts, codes, "ethan"))
    lengths = [context_length(cfg, s.input_ids) + s.codes.shape[0] for s in samples]
    assert max(lengths) % 2 == odd and lengths[0] != lengths[1]
    return samples


def case_config(odd: bool):
    cfg = toy_config("a")  # 4 heads, 2 query groups, expert FFN 12, shared 14, codec vocab 1064: all split by 2
    return dataclasses.replace(cfg, aux_loss_coeff=0.0) if odd else cfg


def rank_state(state, rank: int, size: int, megatron_prefix: str = "backbone."):
    """The unsharded state cut for one tensor-parallel rank (megatron's column / row splits of the tensors
    under ``megatron_prefix``; fused [gate; up] fc1 per half)."""
    local = {}
    for key, value in state.items():
        if not key.startswith(megatron_prefix):  # projections and code predictor: replicated
            local[key] = value
        elif key.endswith("linear_fc1.weight"):
            local[key] = tp_slice(GATED, value, 0, rank, size)
        elif key.endswith(ROWS) or key.endswith(COLUMNS):
            local[key] = tp_slice(COPY, value, 0 if key.endswith(ROWS) else 1, rank, size)
        else:
            local[key] = value
    return local


def full_grads(talker):
    """{name: gradient at full shape}: tensor-parallel shards gathered over the group; replicated gradients
    must agree on every rank."""
    group = parallel_state.get_tensor_model_parallel_group()
    size = dist.get_world_size(group)
    grads = {}
    for name, param in talker.named_parameters():
        grad = param.main_grad.detach().clone()
        pieces = [torch.empty_like(grad) for _ in range(size)]
        dist.all_gather(pieces, grad, group=group)
        if getattr(param, "tensor_model_parallel", False):
            gated = name.endswith(("linear_fc1.weight", "linear_fc1_weight"))
            grads[name] = tp_unslice(GATED if gated else COPY, pieces, param.partition_dim)
        else:
            assert all(torch.equal(p, grad) for p in pieces), f"{name}: replicated gradient differs across ranks"
            grads[name] = grad
    return grads


KEYS = ("loss_codec0", "loss_residual", "codec0_logits", "residual_logits")


def one_pass(model, samples, forward_only: bool):
    """Forward (and backward) of the whole Talker: its outputs."""
    if forward_only:
        with torch.no_grad():
            return model(samples)
    out = model(samples, return_logits=True)
    out["loss"].backward()
    return out


def pipeline_pass(model, samples, forward_only: bool):
    """One micro-batch through megatron's pipeline schedule: the last stage's outputs (None elsewhere)."""
    def forward_step(data_iterator, chunk):
        out = chunk(next(data_iterator), return_logits=not forward_only)
        if isinstance(out, torch.Tensor):  # not the last stage: sent on
            return out, None
        return out["loss"], lambda loss: (loss, {k: v.detach() for k, v in out.items() if k in KEYS})

    length = model.module.teacher_forced_layout(samples)["codec0_targets"].shape[1]
    outputs = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([samples]),
                                          model=[model], num_microbatches=1, seq_length=length,
                                          micro_batch_size=len(samples), forward_only=forward_only)
    return outputs[0] if outputs else None


def train_step(cfg, layout, state, samples, run=one_pass, local=lambda talker, state: state, name=lambda n: n):
    """Losses, logits and full gradients (by unsharded name) of one step, then the losses after one AdamW
    update (losses and logits: the last stage's)."""
    reset_moe_aux_state()
    talker = build_talker(cfg, layout, device="cpu", params_dtype=torch.float32)
    missing, unexpected = talker.load_state_dict(local(talker, state), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    model = wrap_data_parallel(talker.train(), layout, on_gpu=False)
    optimizer = build_optimizer(OPTIM, model, layout, bf16=False, on_gpu=False)
    out = run(model, samples, forward_only=False)
    scaling = GradScaling()
    finalize_grads([model], None, pending=scaling)
    result = {key: out[key].detach() for key in KEYS} if out is not None else {}
    result["grads"] = {name(n): grad for n, grad in full_grads(talker).items()}
    optimizer.prepare_grads()
    norm = grad_norm(optimizer, scaling)
    apply_update(optimizer, norm, scaling, OPTIM.clip_grad)
    result["grad_norm"] = norm
    model.zero_grad_buffer()
    after = run(model, samples, forward_only=True)
    if after is not None:
        result.update(step2_codec0=after["loss_codec0"], step2_residual=after["loss_residual"])
    return result


THINKER = ThinkerConfig(vocab_size=128, hidden_size=THINKER_HIDDEN, num_layers=2, num_attention_heads=4,
                        num_query_groups=2, head_dim=6, num_experts=0, ffn_hidden_size=16, mrope_section=[1, 1, 1])
THINKER_IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def thinker_signals(layout, state):
    """What capture_thinker_signals reads from a text-only Thinker LM: (embeds, hidden) [B, S, Ht]."""
    thinker = build_thinker_lm(THINKER, layout, device="cpu", params_dtype=torch.float32)
    missing, unexpected = thinker.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    positions = torch.arange(THINKER_IDS.shape[1]).expand(3, *THINKER_IDS.shape)
    with torch.no_grad(), capture_thinker_signals(thinker.eval(), accept_hidden_layer=1) as signals:
        thinker(THINKER_IDS, positions, None)
    return signals["embeds"].clone(), signals["hidden"].clone()


def _worker(rank, port, weights, result_dir):
    from omni_train.parallel.setup import init_parallel, shutdown_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(TP))
    torch.set_num_threads(1)
    init_parallel(LAYOUT, torch.device("cpu"), seed=rank)  # different seeds: replicated parts must not care
    try:
        for odd in (False, True):
            cfg = case_config(odd)
            state = rank_state(hf_to_talker(load_file(weights), cfg), rank, TP)
            torch.save(train_step(cfg, LAYOUT, state, batch(cfg, odd)), result_dir / f"rank{rank}_odd{odd}.pt")
        thinker = rank_state(torch.load(result_dir / "thinker.pt"), rank, TP, megatron_prefix="")
        torch.save(thinker_signals(LAYOUT, thinker), result_dir / f"signals{rank}.pt")
    finally:
        shutdown_parallel()


def assert_close(got, want, what):
    assert got.shape == want.shape, what
    assert (got - want).abs().max() <= MAX_DIFF, (what, (got - want).abs().max())


def check_against_one_process(tmp_path, weights, files):
    """Each case's saved results (``files(odd)``: [(path, keys)]) against a one-process run."""
    for odd in (False, True):
        cfg = case_config(odd)
        want = train_step(cfg, ParallelConfig(), hf_to_talker(load_file(weights), cfg), batch(cfg, odd))
        assert [n for n, g in want["grads"].items() if not g.abs().sum() > 0] == []  # every part is trained
        grads = {}
        for path, keys in files(odd):
            got = torch.load(path)
            for key in keys:
                assert_close(got[key], want[key], (odd, path.name, key))
            for name, grad in got["grads"].items():
                assert_close(grad, want["grads"][name], (odd, path.name, name))
                grads[name] = grad
        assert sorted(grads) == sorted(want["grads"])
        assert want["step2_codec0"] < want["loss_codec0"]  # the step moved the model


def test_tensor_parallel_trains_as_one_process(megatron_world1, tmp_path):
    cfg = case_config(False)
    tiny_omni(cfg).save_pretrained(tmp_path)
    weights = str(tmp_path / "model.safetensors")
    torch.manual_seed(0)
    thinker = build_thinker_lm(THINKER, ParallelConfig(), device="cpu", params_dtype=torch.float32).state_dict()
    torch.save(thinker, tmp_path / "thinker.pt")
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(free_port(), weights, tmp_path), nprocs=TP, join=True)
    keys = KEYS + ("grad_norm", "step2_codec0", "step2_residual")
    check_against_one_process(tmp_path, weights,
                              lambda odd: [(tmp_path / f"rank{rank}_odd{odd}.pt", keys) for rank in range(TP)])
    # the frozen Thinker's signals at the same layout: the whole sequence on every rank
    want = thinker_signals(ParallelConfig(), thinker)
    for rank in range(TP):
        for got, reference in zip(torch.load(tmp_path / f"signals{rank}.pt"), want):
            assert_close(got, reference, ("thinker signals", rank))


# ----- pipeline parallel ----------------------------------------------------------------------------------

PP_LAYOUT = ParallelConfig(pp=PP)
COPIES = {"codec_table.": "backbone.embedding.word_embeddings.", "residual_tables.": "code_predictor.codec_embedding."}


def _layer(key: str):
    found = re.search(r"decoder\.layers\.(\d+)\.", key)
    return int(found.group(1)) if found else None


def stage_state(cfg, stage: int):
    """(local state for this stage's Talker, local -> unsharded name): its layers renumbered from 0, the
    copies (pipeline.py) from their owners' tensors, modules of other stages left out."""
    per = cfg.num_layers // PP

    def renumber(key, offset):
        layer = _layer(key)
        return key if layer is None else key.replace(f"layers.{layer}.", f"layers.{layer + offset}.", 1)

    def local(talker, state):
        out = {}
        for key, value in state.items():
            layer = _layer(key)
            if layer is not None and layer // per != stage:
                continue
            key = renumber(key, -stage * per)
            for copy, owner in COPIES.items():
                if key.startswith(owner) and _has_module(talker, copy + key[len(owner):]):
                    out[copy + key[len(owner):]] = value
            if _has_module(talker, key):
                out[key] = value
        return out

    def name(key):
        for copy, owner in COPIES.items():
            if key.startswith(copy):
                return owner + key[len(copy):]
        return renumber(key, stage * per)

    return local, name


def _has_module(talker, key: str) -> bool:
    try:
        return talker.get_submodule(key.rsplit(".", 1)[0]) is not None
    except AttributeError:
        return False


def _pp_worker(rank, port, weights, result_dir):
    from omni_train.parallel.setup import init_parallel, shutdown_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(PP))
    torch.set_num_threads(1)
    init_parallel(PP_LAYOUT, torch.device("cpu"), seed=rank)
    try:
        for odd in (False, True):
            cfg = case_config(odd)
            local, name = stage_state(cfg, rank)
            result = train_step(cfg, PP_LAYOUT, hf_to_talker(load_file(weights), cfg), batch(cfg, odd),
                                run=pipeline_pass, local=local, name=name)
            torch.save(result, result_dir / f"stage{rank}_odd{odd}.pt")
    finally:
        shutdown_parallel()


def test_pipeline_parallel_trains_as_one_process(megatron_world1, tmp_path):
    cfg = case_config(False)
    tiny_omni(cfg).save_pretrained(tmp_path)
    weights = str(tmp_path / "model.safetensors")
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_pp_worker, args=(free_port(), weights, tmp_path), nprocs=PP, join=True)
    last = KEYS + ("grad_norm", "step2_codec0", "step2_residual")
    check_against_one_process(tmp_path, weights, lambda odd: [(tmp_path / f"stage0_odd{odd}.pt", ("grad_norm",)),
                                                              (tmp_path / f"stage1_odd{odd}.pt", last)])


@pytest.mark.parametrize("layout, key, error", [
    (ParallelConfig(pp=3), "parallel.pp", ValueError),  # 2 layers
    (ParallelConfig(cp=2), "parallel.cp", NotImplementedError),
    (ParallelConfig(tp=2), "parallel.sequence_parallel", ValueError),
    (ParallelConfig(sequence_parallel=True), "parallel.sequence_parallel", ValueError),
    (ParallelConfig(tp=4, sequence_parallel=True), "parallel.tp", ValueError),  # 2 query groups
    (ParallelConfig(ep=2), "parallel.ep", ValueError),  # 5 experts
    (ParallelConfig(pp=2, token_dispatcher="allgather"), "parallel.token_dispatcher", ValueError),
], ids=["pp3", "cp2", "tp2_no_sp", "sp_without_tp", "tp4", "ep2", "pp2_allgather"])
def test_unsupported_layouts_are_refused_by_key(layout, key, error):
    cfg = toy_config("a")
    assert talker_layout_problems(cfg, layout)[0][0] == key
    with pytest.raises(error, match=f"talker layout: {key}: "):
        build_talker(cfg, layout, device="meta", params_dtype=torch.float32)
    assert talker_layout_problems(cfg, LAYOUT) == talker_layout_problems(cfg, PP_LAYOUT) == []
