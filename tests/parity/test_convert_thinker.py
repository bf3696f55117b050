"""The multimodal Thinker (towers + megatron LM) reads an `omni-convert import` checkpoint and its own
checkpoints export like one: trained tower weights are written back, the talker comes from the import."""

import json
import shutil

import torch
from megatron.core import dist_checkpointing

from omni_train.checkpoint.manager import MARKER, load_model_weights
from omni_train.config.schema import ParallelConfig
from omni_train.export.convert import export_hf, import_hf
from omni_train.export.hf_io import HFReader
from omni_train.models.thinker.omni import build_omni_thinker
from omni_train.models.thinker.bridge import model_config_from_hf
from tests.parity.test_convert import hf_dir  # noqa: F401  (fixture)

TOWER_WEIGHT = "thinker.visual.blocks.0.mlp.linear_fc1.weight"


def test_import_into_thinker_then_export_trained_towers(megatron_world1, hf_dir, tmp_path):  # noqa: F811
    imported = import_hf(hf_dir, tmp_path / "imported", ParallelConfig())
    config = json.loads((hf_dir / "config.json").read_text())["thinker_config"]
    thinker = build_omni_thinker(config, model_config_from_hf(config["text_config"]), ParallelConfig(),
                                 device="cpu", params_dtype=torch.float32)
    load_model_weights(imported, thinker)
    original = HFReader(hf_dir)
    for name, param in thinker.named_parameters():
        if name.startswith(("audio_tower.", "visual.")):
            assert torch.equal(param, original.get(f"thinker.{name}")), name

    with torch.no_grad():  # "training" moves one tower weight
        dict(thinker.named_parameters())[TOWER_WEIGHT.removeprefix("thinker.")].add_(1.0)
    trained = tmp_path / "trained"
    trained.mkdir()
    dist_checkpointing.save({"model": thinker.sharded_state_dict()}, str(trained))
    shutil.copy(imported / "config.json", trained / "config.json")
    (trained / MARKER).write_text(json.dumps({"step": 1, "consumed_samples": 0, "hf_source": "qwen3_omni_moe",
                                              "carried_from": str(imported)}))

    exported = HFReader(export_hf(trained, tmp_path / "exported"))
    assert sorted(exported.names()) == sorted(original.names())
    for name in original.names():
        expected = original.get(name) + (1.0 if name == TOWER_WEIGHT else 0.0)
        assert torch.equal(exported.get(name), expected), name
