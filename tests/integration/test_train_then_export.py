"""Import an HF Qwen3-Omni, train a few steps with the real CLI, export: transformers reloads the export
and its thinker gives our trained model's logits; the untouched parts (towers, talker, code2wav) come
back bit-identical."""

import json

import pytest
import torch

from cli import metrics, omni_train, run_module
from omni_train.checkpoint.manager import latest_checkpoint
from omni_train.export.hf_io import HFReader
from tests.parity.test_convert import assert_export_gives_our_logits

# conf/model overrides giving the tiny HF thinker's text sizes (tests/parity/test_convert.py)
MODEL = ["model.thinker.vocab_size=128", "model.thinker.hidden_size=32", "model.thinker.num_layers=2", "model.thinker.num_attention_heads=4",
         "model.thinker.num_query_groups=2", "model.thinker.head_dim=16", "model.thinker.moe_ffn_hidden_size=24", "model.thinker.num_experts=4",
         "model.thinker.router_topk=2", "model.thinker.mrope_section=[4,2,2]", "model.thinker.rope_theta=10000.0"]


def convert(*args):
    proc = run_module("omni_train.export.convert", list(args), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture
def hf_dir(tiny_hf_omni_dir):
    """tests/parity/test_convert.py's tiny_omni_model(), saved once per session (tests/conftest.py)."""
    return tiny_hf_omni_dir


def test_train_export_reload(megatron_world1, hf_dir, tmp_path):
    convert("import", hf_dir, tmp_path / "imported")
    run_dir = tmp_path / "run" / "finetune"
    omni_train([*MODEL, f"init_from={tmp_path / 'imported'}", f"run_dir={run_dir}", "trainer.max_steps=3",
                "optim.warmup_steps=1", "trainer.seq_length=32"])
    assert metrics(run_dir)[3]["loss"] < metrics(run_dir)[1]["loss"]
    convert("export", run_dir / "checkpoints", tmp_path / "exported")

    original, exported = HFReader(hf_dir), HFReader(tmp_path / "exported")
    assert sorted(exported.names()) == sorted(original.names())
    changed = [n for n in original.names() if not torch.equal(original.get(n), exported.get(n))]
    assert changed and all(n.startswith(("thinker.model.", "thinker.lm_head")) for n in changed)
    assert json.loads((tmp_path / "exported" / "config.json").read_text()) == json.loads(
        (hf_dir / "config.json").read_text())

    assert_export_gives_our_logits(tmp_path / "exported", latest_checkpoint(run_dir / "checkpoints"))
