"""A dense Qwen3 LM (Qwen3ForCausalLM) as a teacher source ("qwen3"): a tiny random one, saved with tied and
with untied embeddings, imported in memory as a frozen ``hf:<dir>`` teacher is (frozen.import_hf_in_memory),
gives transformers' fp32 logits within 1e-5 at tp=1 and at tp=2 (two gloo processes, no sequence
parallelism: a dense LM does not need it); a config our model cannot represent is refused naming the field."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from transformers import Qwen3Config, Qwen3ForCausalLM

from omni_train.config.schema import ParallelConfig
from omni_train.export.convert import main
from omni_train.export.verify import detect_source
from omni_train.frozen import import_hf_in_memory
from omni_train.parallel.setup import init_parallel, shutdown_parallel
from tests.conftest import free_port
from tests.parity.test_verify import clean_env, randomize  # noqa: F401  (fixture)

VOCAB, LENGTH = 96, 11
# sizes no other test uses: head dim 12 (our default rotary split), 3 query heads per kv head, FFN 20
SIZES = dict(vocab_size=VOCAB, hidden_size=24, intermediate_size=20, num_hidden_layers=3, num_attention_heads=6,
             num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-6,
             rope_parameters=dict(rope_type="default", rope_theta=30000.0))
TIES = {"tied": True, "untied": False}


def save_qwen3(path: Path, tie: bool) -> Path:
    model = randomize(Qwen3ForCausalLM(Qwen3Config(**SIZES, tie_word_embeddings=tie)), seed=3)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen3_dirs(tmp_path_factory):
    return {name: save_qwen3(tmp_path_factory.mktemp(name), tie) for name, tie in TIES.items()}


def _inputs():
    ids = torch.randint(0, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(7))
    return ids, torch.arange(LENGTH).expand(3, 3, LENGTH)  # plain RoPE: the three position rows equal


def _reference(hf_dir: Path) -> torch.Tensor:
    model = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, local_files_only=True,
                                             attn_implementation="eager").eval()
    with torch.no_grad():
        return model(input_ids=_inputs()[0]).logits


def _our_logits(hf_dir: Path, layout: ParallelConfig) -> torch.Tensor:
    # the trained model's towers on: a text-only source still imports as the LM alone
    cfg = SimpleNamespace(parallel=layout, model=SimpleNamespace(thinker=SimpleNamespace(towers=True)))
    teacher = import_hf_in_memory(hf_dir, cfg).eval()
    ids, positions = _inputs()
    with torch.no_grad():
        logits = teacher(ids, positions, None)
        if layout.tp > 1:  # vocab-parallel output: gather the vocabulary shards
            logits = gather_from_tensor_model_parallel_region(logits)
    return logits


def test_detect_source_and_sizes(qwen3_dirs):
    from omni_train.models.thinker.bridge import model_config_from_hf

    for name, hf_dir in qwen3_dirs.items():
        assert detect_source(hf_dir) == "qwen3"
        cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
        assert (cfg.num_experts, cfg.ffn_hidden_size, cfg.tie_word_embeddings) == (0, 20, TIES[name])
        assert cfg.rope_theta == 30000.0 and sum(cfg.mrope_section) == 6
    # a tied checkpoint has no lm_head tensor on disk
    from omni_train.export.hf_io import HFReader

    assert "lm_head.weight" not in HFReader(qwen3_dirs["tied"]) and "lm_head.weight" in HFReader(qwen3_dirs["untied"])


@pytest.mark.parametrize("name", sorted(TIES))
def test_tp1_matches_transformers(qwen3_dirs, clean_env, name):  # noqa: F811
    init_parallel(ParallelConfig(backend="gloo"), torch.device("cpu"), seed=0)
    try:
        ours = _our_logits(qwen3_dirs[name], ParallelConfig())
    finally:
        shutdown_parallel()
    expected = _reference(qwen3_dirs[name])
    assert ours.shape == expected.shape == (3, LENGTH, VOCAB)
    assert (ours - expected).abs().max() < 1e-5


def _worker(rank, port, dirs, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    layout = ParallelConfig(tp=2, backend="gloo")
    init_parallel(layout, torch.device("cpu"), seed=0)
    try:
        for name, hf_dir in dirs.items():
            torch.save(_our_logits(hf_dir, layout), result_dir / f"{name}_{rank}.pt")
        dist.barrier()
    finally:
        shutdown_parallel()


def test_tp2_matches_transformers(qwen3_dirs, tmp_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(free_port(), qwen3_dirs, tmp_path), nprocs=2, join=True)
    for name, hf_dir in qwen3_dirs.items():
        expected = _reference(hf_dir)
        for rank in (0, 1):
            ours = torch.load(tmp_path / f"{name}_{rank}.pt")
            assert ours.shape == expected.shape
            assert (ours - expected).abs().max() < 1e-5, (name, rank)


@pytest.mark.parametrize("field, value, match", [
    ("attention_bias", True, r"text_config.attention_bias=True is not supported \(need False\)"),
    ("hidden_act", "gelu", r"text_config.hidden_act='gelu' is not supported \(need 'silu'\)"),
    ("layer_types", ["full_attention", "sliding_attention", "full_attention"],
     r"text_config.layer_types holds \['sliding_attention'\]: not supported"),
    ("intermediate_size", 22, r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape \[20, 24\], "
     r"the config implies \[22, 24\]"),
], ids=["bias", "activation", "sliding", "size"])
def test_unsupported_config_is_refused_naming_the_field(tmp_path, clean_env, field, value, match):  # noqa: F811
    hf_dir = save_qwen3(tmp_path / "qwen3", tie=False)
    config = json.loads((hf_dir / "config.json").read_text())
    config[field] = value
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=f"^omni-convert verify: {match}"):
        main(["verify", str(hf_dir)])


def test_verify_passes(qwen3_dirs, clean_env, capsys):  # noqa: F811
    main(["verify", str(qwen3_dirs["tied"]), "--atol", "1e-5"])
    out = capsys.readouterr().out.splitlines()
    assert "Qwen3ForCausalLM" in out[0] and out[-1] == "omni-convert verify: OK (text within atol 1.0e-05)"
