"""omni-convert verify: toy HF directories of sizes the project never used pass (every input kind within
1e-4); a conversion bug (k and v swapped in the bridge) or a corrupted tower tensor fails naming the input
kind and the numbers; what import refuses fails with import's message; --ep 2 under torchrun passes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeThinkerConfig

from cli import run_module
from omni_train.export import verify as verify_module
from omni_train.export.convert import main
from omni_train.models.thinker import bridge

REPO = Path(__file__).resolve().parents[2]
ALL_OK = "omni-convert verify: OK (text, audio, image, video, audio_in_video within atol 1.0e-04)"

# Sizes chosen to differ from every other test's (vocab 128, hidden 32, head dim 16 / 8, merge 2, mel 16).
OMNI = {
    # spatial merge 1, head dim 12, 5 experts top-2, DeepStack into layer 0 from vision block 1, 20 mel
    # bins, the released n_window (50: full 100-frame chunks), the released position_id_per_seconds (13)
    "merge1_hd12": dict(vocab=152, hidden=48, layers=2, heads=6, kv=2, head_dim=12, mrope=[2, 2, 2], experts=5,
                        topk=2, ffn=20, merge=1, patch=2, mel=20, n_window=50, deepstack=[1], depth=2, pps=13,
                        ids=(140, 141, 142, 143, 144), talker=False),
    # spatial merge 2, head dim 20, MQA, 8 experts top-3, two DeepStack levels, 24 mel bins, n_window 8
    # (partial chunks only), low placeholder ids, with a talker and code2wav (the full released layout)
    "merge2_hd20": dict(vocab=200, hidden=40, layers=3, heads=4, kv=1, head_dim=20, mrope=[4, 3, 3], experts=8,
                        topk=3, ffn=12, merge=2, patch=4, mel=24, n_window=8, deepstack=[0, 2], depth=3, pps=25,
                        ids=(7, 8, 9, 10, 11), talker=True),
}


def omni_config(s: dict) -> Qwen3OmniMoeConfig:
    audio, image, video, vision_start, audio_start = s["ids"]
    text = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], num_key_value_heads=s["kv"], head_dim=s["head_dim"],
                moe_intermediate_size=s["ffn"], num_experts=s["experts"], num_experts_per_tok=s["topk"],
                norm_topk_prob=True, tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
                rope_parameters=dict(rope_type="default", rope_theta=50000.0, mrope_section=s["mrope"],
                                     interleaved=True))
    thinker = dict(
        text_config=text,
        audio_config=dict(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=24,
                          output_dim=s["hidden"], n_window=s["n_window"], num_mel_bins=s["mel"],
                          downsample_hidden_size=8),
        vision_config=dict(depth=s["depth"], hidden_size=16, intermediate_size=24, num_heads=2,
                           patch_size=s["patch"], spatial_merge_size=s["merge"], num_position_embeddings=16,
                           out_hidden_size=s["hidden"], deepstack_visual_indexes=s["deepstack"]),
        audio_token_id=audio, image_token_id=image, video_token_id=video, vision_start_token_id=vision_start,
        audio_start_token_id=audio_start, position_id_per_seconds=s["pps"],
    )
    if not s["talker"]:
        return Qwen3OmniMoeConfig(thinker_config=thinker, enable_audio_output=False)
    talker = dict(
        text_config=dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=8, moe_intermediate_size=8, num_experts=2,
                         num_experts_per_tok=1, shared_expert_intermediate_size=8,
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1],
                                              interleaved=True)),
        code_predictor_config=dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_code_groups=4),
        num_code_groups=4, thinker_hidden_size=s["hidden"], accept_hidden_layer=1, spatial_merge_size=s["merge"],
        audio_token_id=audio, image_token_id=image, video_token_id=video, vision_start_token_id=vision_start,
        audio_start_token_id=audio_start,
    )
    code2wav = dict(codebook_size=32, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=32, num_hidden_layers=1, num_quantizers=4, upsample_rates=[2, 2],
                    upsampling_ratios=[2], decoder_dim=16, sliding_window=8)
    return Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=talker, code2wav_config=code2wav)


def randomize(model, seed=0):
    """Every parameter drawn from the seed: non-trivial norms and routers, not the HF init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name or ".ln_" in name else 0.2 * torch.randn_like(p))
    return model


def save_omni(name: str, path: Path) -> Path:
    randomize(Qwen3OmniMoeForConditionalGeneration(omni_config(OMNI[name]))).save_pretrained(
        path, max_shard_size="300KB")  # several shards: the reader follows the index
    return path


def save_qwen3_moe(path: Path) -> Path:
    # vocab 90, head dim 24 (no mrope section in the config: our default split), 3 experts top-2, expert
    # width 10 (transformers' grouped_mm refuses its 40-byte rows: the reference runs eager experts)
    config = Qwen3MoeConfig(vocab_size=90, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=24, moe_intermediate_size=10, num_experts=3,
                            num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False,
                            decoder_sparse_step=1, mlp_only_layers=[],
                            rope_parameters=dict(rope_type="default", rope_theta=20000.0))
    randomize(Qwen3MoeForCausalLM(config)).save_pretrained(path)
    # transformers 5 writes "num_local_experts" (released config.json files say "num_experts"): the
    # bridge reads both
    return path


@pytest.fixture(scope="module")
def omni_dirs(tmp_path_factory):
    return {name: save_omni(name, tmp_path_factory.mktemp(name)) for name in OMNI}


@pytest.fixture
def clean_env():
    """main() sets up and tears down its own process group; keep torchrun's variables out of later tests."""
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def verify_lines(capsys, argv):
    main(["verify", *argv])
    return capsys.readouterr().out.splitlines()


@pytest.mark.parametrize("name", sorted(OMNI))
def test_omni_passes_every_kind(omni_dirs, clean_env, capsys, name):
    out = verify_lines(capsys, [str(omni_dirs[name])])
    rows = [line.split() for line in out if line.startswith("  ")]
    assert [r[0] for r in rows] == list(verify_module.KINDS), out
    for row in rows:  # "kind max |diff| X mean |diff| Y logits [...]"
        assert float(row[3]) <= 1e-4 and float(row[6]) <= float(row[3]), row
    assert out[-1] == ALL_OK
    print("\n".join(out))


def test_inputs_hold_every_placeholder_kind(omni_dirs):
    """The cases really carry media: placeholder counts match the towers' outputs (else OmniThinker
    raises), vision positions differ per axis, audio in video interleaves both placeholders."""
    config = json.loads((omni_dirs["merge1_hd12"] / "config.json").read_text())["thinker_config"]
    thinker = Qwen3OmniMoeThinkerConfig(**config)
    cases = {c.kind: c for c in verify_module.build_cases(152, thinker)}
    assert (cases["audio"].input_ids == 140).sum() > 0 and "input_features" in cases["audio"].media
    assert (cases["image"].input_ids == 141).sum() == 4 + 6  # grids (1, 2, 2), (1, 2, 3) at merge 1
    assert not torch.equal(cases["video"].positions[1], cases["video"].positions[2])
    row = cases["audio_in_video"].input_ids[0].tolist()
    first_audio, last_video = row.index(140), len(row) - 1 - row[::-1].index(142)
    assert first_audio < last_video  # interleaved, not one block after the other


def test_qwen3_moe_subprocess(tmp_path):
    hf_dir = save_qwen3_moe(tmp_path / "qwen3_moe")
    # a fresh environment (cli._env): this process's MASTER_PORT may belong to a process group an
    # in-process test left bound, and the subprocess would fail to listen on it (EADDRINUSE)
    done = run_module("omni_train.export.convert", ["verify", hf_dir], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"omni-convert verify: {hf_dir} (Qwen3MoeForCausalLM, tp=1 ep=1, fp32")
    assert lines[1].split()[:3] == ["text", "max", "|diff|"] and lines[1].endswith("logits [2, 16, 90]")
    assert lines[-1] == "omni-convert verify: OK (text within atol 1.0e-04)"


def failed_kinds(message: str):
    """The kinds a failure message names, in order."""
    return [kind for kind in verify_module.KINDS if f" {kind} (max |diff| " in message.replace("for ", " ")]


def test_swapped_k_v_fails_naming_the_kind(omni_dirs, clean_env, capsys, monkeypatch):
    """A bridge bug that shapes cannot catch (k and v have one shape): every kind fails, status 1."""
    merge = bridge._merge_qkv
    monkeypatch.setattr(bridge, "_merge_qkv", lambda q, k, v, cfg: merge(q, v, k, cfg))
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(omni_dirs["merge1_hd12"])])
    message = exit_info.value.code
    assert isinstance(message, str)  # printed to stderr, exit status 1
    assert message.startswith("omni-convert verify: logits differ from transformers' for text (max |diff| ")
    assert "> atol 1.0e-04, mean " in message
    assert failed_kinds(message) == list(verify_module.KINDS), message
    assert len(capsys.readouterr().out.splitlines()) == 1 + len(verify_module.KINDS)  # the table, no OK


def test_corrupted_vision_tower_fails_only_vision_kinds(omni_dirs, clean_env, monkeypatch):
    """One tower tensor 1% off in our import (the reference reads the directory itself): text and audio
    pass, the three kinds that run the vision tower fail."""
    get = verify_module.HFReader.get
    target = "thinker.visual.merger.mlp.2.weight"  # the last projection into the LM's width
    assert target in verify_module.HFReader(omni_dirs["merge2_hd20"])
    monkeypatch.setattr(verify_module.HFReader, "get",
                        lambda self, name: get(self, name) * (1.01 if name == target else 1.0))
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(omni_dirs["merge2_hd20"])])
    assert failed_kinds(exit_info.value.code) == ["image", "video", "audio_in_video"], exit_info.value.code


@pytest.mark.parametrize("field, value, match", [
    ("mlp_only_layers", [1], r"text_config.mlp_only_layers=\[1\] is not supported \(every layer must be MoE\)"),
    ("num_experts", 4, r"tensor 'model.layers.0.mlp.gate.weight' has shape \[3, 24\], the config implies \[4, 24\]"),
    ("architectures", ["Qwen3MoeModel"], r"unsupported architecture: config.json field 'architectures' is "
     r"\['Qwen3MoeModel'\], expected \['Qwen3OmniMoeForConditionalGeneration'\] or"),
], ids=["field", "size", "architecture"])
def test_import_errors_keep_their_message(tmp_path, clean_env, field, value, match):
    """What import refuses (a field or size our model cannot represent) fails with import's message."""
    hf_dir = save_qwen3_moe(tmp_path / "qwen3_moe")
    config = json.loads((hf_dir / "config.json").read_text())
    config[field] = value
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=f"^omni-convert verify: {match}"):
        main(["verify", str(hf_dir)])


def test_ep2_under_torchrun(omni_dirs):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "omni_train.export.convert", "verify", str(omni_dirs["merge2_hd20"]), "--ep", "2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "tp=1 ep=2" in lines[0] and lines[-1] == ALL_OK
    assert [line.split()[0] for line in lines[1:-1]] == list(verify_module.KINDS)
