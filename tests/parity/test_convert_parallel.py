"""Import at ep=2 and at tp=2 (two gloo processes each): the sharded megatron LM loaded from the import
gives transformers' thinker logits on every rank, and the checkpoint exports back bit-identical."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
from transformers import Qwen3OmniMoeForConditionalGeneration

from cli import spawn
from omni_train.checkpoint.manager import load_model_weights
from omni_train.config.schema import ParallelConfig
from omni_train.export.convert import main
from omni_train.models.thinker.lm import build_thinker_lm
from omni_train.models.thinker.bridge import model_config_from_hf
from omni_train.parallel.setup import init_parallel, shutdown_parallel
from tests.conftest import free_port
from tests.parity.test_convert import assert_identical, hf_dir  # noqa: F401  (fixture)

LAYOUTS = {"ep2": ParallelConfig(ep=2), "tp2": ParallelConfig(tp=2, sequence_parallel=True)}


def _worker(rank, ports, hf_dir, ckpt, layout_name, result_dir):
    hf_dir, ckpt, result_dir = Path(hf_dir), Path(ckpt), Path(result_dir)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    layout = LAYOUTS[layout_name]
    flags = ["--ep", "2"] if layout.ep == 2 else ["--tp", "2"]
    main(["import", str(hf_dir), str(ckpt), *flags])  # sets up and tears down its own process groups
    os.environ["MASTER_PORT"] = str(ports[1])  # a fresh rendezvous for the second process group
    init_parallel(layout, torch.device("cpu"), seed=0)
    try:
        text = json.loads((hf_dir / "config.json").read_text())["thinker_config"]["text_config"]
        ours = build_thinker_lm(model_config_from_hf(text), layout, device="cpu", params_dtype=torch.float32)
        load_model_weights(ckpt, ours)
        input_ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = ours.eval()(input_ids, torch.arange(12).expand(2, 12), None)
            if layout.tp > 1:  # vocab-parallel output: gather the vocabulary shards
                logits = gather_from_tensor_model_parallel_region(logits)
        torch.save(logits, result_dir / f"logits_{rank}.pt")
        dist.barrier()
    finally:
        shutdown_parallel()


@pytest.mark.parametrize("layout_name", sorted(LAYOUTS))
def test_sharded_import_matches_transformers_and_exports_identical(hf_dir, tmp_path, layout_name):  # noqa: F811
    os.environ["OMP_NUM_THREADS"] = "1"
    ckpt = tmp_path / "ckpt"
    ports = (free_port(), free_port())
    spawn(_worker, [ports, str(hf_dir), str(ckpt), layout_name, str(tmp_path)])  # as mp.spawn (tests/cli.py)
    for key in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        os.environ.pop(key, None)

    reference = Qwen3OmniMoeForConditionalGeneration.from_pretrained(hf_dir, local_files_only=True).eval()
    input_ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference.thinker(input_ids=input_ids,
                                     position_ids=torch.arange(12).expand(3, 2, 12)).logits
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(tmp_path / f"logits_{rank}.pt"), expected, rtol=1e-5, atol=1e-5)

    main(["export", str(ckpt), str(tmp_path / "hf_out")])
    assert_identical(tmp_path / "hf_out", hf_dir)
