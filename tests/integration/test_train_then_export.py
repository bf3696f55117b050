"""Import an HF Qwen3-Omni, train a few steps with the real CLI, export: transformers reloads the export
and its thinker gives our trained model's logits; the untouched parts (towers, talker, code2wav) come
back bit-identical."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import Qwen3OmniMoeForConditionalGeneration

from cli import REPO, _env, metrics, omni_train
from omni_train.checkpoint.manager import latest_checkpoint, load_model_weights
from omni_train.config.schema import ParallelConfig
from omni_train.export.hf_io import HFReader
from omni_train.models.thinker_lm import build_thinker_lm
from omni_train.models.thinker_lm_bridge import model_config_from_hf
from tests.parity.test_convert import tiny_omni_model

# conf/model overrides giving the tiny HF thinker's text sizes (tests/parity/test_convert.py)
MODEL = ["model.vocab_size=128", "model.hidden_size=32", "model.num_layers=2", "model.num_attention_heads=4",
         "model.num_query_groups=2", "model.head_dim=16", "model.moe_ffn_hidden_size=24", "model.num_experts=4",
         "model.router_topk=2", "model.mrope_section=[4,2,2]", "model.rope_theta=10000.0"]


def convert(*args):
    proc = subprocess.run([sys.executable, "-m", "omni_train.export.convert", *map(str, args)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture
def hf_dir(tmp_path):
    model = tiny_omni_model()
    path = tmp_path / "hf"
    model.save_pretrained(path)
    return path


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

    cfg = model_config_from_hf(json.loads((hf_dir / "config.json").read_text())["thinker_config"]["text_config"])
    ours = build_thinker_lm(cfg, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    load_model_weights(latest_checkpoint(run_dir / "checkpoints"), ours)
    reloaded = Qwen3OmniMoeForConditionalGeneration.from_pretrained(tmp_path / "exported",
                                                                    local_files_only=True).eval()
    input_ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        ref = reloaded.thinker(input_ids=input_ids, position_ids=positions.expand(3, -1, -1)).logits
        got = ours.eval()(input_ids, positions, None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
