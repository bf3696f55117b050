"""omni-convert: a tiny random full Qwen3-Omni (thinker + talker + code2wav) through import -> export.

Import at world size 1 and at ep=2 (two gloo processes); export at world size 1; every tensor must come
back bit-identical, the config equal, transformers must load the export offline, and our megatron LM
loaded from the imported checkpoint must give the HF thinker's logits. Error cases name the culprit.
"""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

from omni_train.checkpoint.manager import load_model_weights
from omni_train.config.schema import ParallelConfig
from omni_train.export.convert import export_hf, import_hf, main
from omni_train.export.hf_io import HFReader
from omni_train.models.thinker.lm import build_thinker_lm
from omni_train.models.thinker.bridge import model_config_from_hf
from tests.conftest import free_port

H = 32  # thinker hidden size


def tiny_omni_config() -> Qwen3OmniMoeConfig:
    text = dict(vocab_size=128, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, moe_intermediate_size=24, num_experts=4,
                num_experts_per_tok=2, norm_topk_prob=True, tie_word_embeddings=False, decoder_sparse_step=1,
                mlp_only_layers=[], rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                         mrope_section=[4, 2, 2], interleaved=True))
    thinker = dict(
        text_config=text,
        audio_config=dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32,
                          output_dim=H, n_window=4, downsample_hidden_size=8),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=H,
                           deepstack_visual_indexes=[0]),
        audio_token_id=100, image_token_id=101, video_token_id=102, vision_start_token_id=103,
        audio_start_token_id=104,
    )
    talker_text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, moe_intermediate_size=8, num_experts=2,
                       num_experts_per_tok=1, shared_expert_intermediate_size=8,
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                            mrope_section=[2, 1, 1], interleaved=True))
    talker = dict(
        text_config=talker_text,
        code_predictor_config=dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                   num_code_groups=4),
        num_code_groups=4, thinker_hidden_size=H, accept_hidden_layer=1, spatial_merge_size=2,
        codec_eos_token_id=60, codec_nothink_id=59, codec_think_bos_id=58, codec_think_eos_id=57,
        codec_pad_id=56, codec_bos_id=55, audio_token_id=100, image_token_id=101, video_token_id=102,
        vision_start_token_id=103, audio_start_token_id=104, speaker_id={"ethan": 50, "chelsie": 51},
    )
    code2wav = dict(codebook_size=32, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=32, num_hidden_layers=1, num_quantizers=4, upsample_rates=[2, 2],
                    upsampling_ratios=[2], decoder_dim=16, sliding_window=8)
    return Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=talker, code2wav_config=code2wav,
                              im_start_token_id=110, im_end_token_id=111, tts_pad_token_id=112,
                              tts_bos_token_id=113, tts_eos_token_id=114, system_token_id=115,
                              user_token_id=116, assistant_token_id=117)


def tiny_omni_model(seed: int = 0) -> Qwen3OmniMoeForConditionalGeneration:
    """The tiny HF model with every parameter drawn from the seed. Transformers leaves some tensors (the
    talker's fused experts) as torch.empty, whose garbage may hold NaN and break bit-equality checks."""
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(tiny_omni_config())
    with torch.no_grad():  # non-trivial norms and router, not the HF init
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    return model


@pytest.fixture
def hf_dir(tiny_hf_omni_dir):
    """tiny_omni_model() saved in several shards (the reader follows the index), once per session
    (tests/conftest.py); read only."""
    return tiny_hf_omni_dir


def read_all(root) -> dict:
    reader = HFReader(root)
    return {n: reader.get(n) for n in reader.names()}


def assert_identical(exported, original):
    got, want = read_all(exported), read_all(original)
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys()), sorted(want.keys() - got.keys()))
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    for name in ("config.json", "generation_config.json"):
        assert json.loads((exported / name).read_text()) == json.loads((original / name).read_text())


def test_round_trip_world1_and_logits(megatron_world1, hf_dir, tmp_path):
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", ParallelConfig())
    out = export_hf(ckpt, tmp_path / "hf_out", max_shard_bytes=100_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert_identical(out, hf_dir)

    assert_export_gives_our_logits(out, ckpt)


def assert_export_gives_our_logits(export_dir, ckpt) -> None:
    """transformers' thinker loaded from `export_dir` gives the logits of our LM loaded from `ckpt`."""
    config = json.loads((export_dir / "config.json").read_text())
    cfg = model_config_from_hf(config["thinker_config"]["text_config"])
    ours = build_thinker_lm(cfg, ParallelConfig(), device="cpu", params_dtype=torch.float32)
    load_model_weights(ckpt, ours)
    reloaded = Qwen3OmniMoeForConditionalGeneration.from_pretrained(export_dir, local_files_only=True).eval()
    reloaded.thinker.config.text_config._attn_implementation = "eager"
    input_ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        ref = reloaded.thinker(input_ids=input_ids, position_ids=positions.expand(3, -1, -1)).logits
        got = ours.eval()(input_ids, positions, None)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _import_ep2(rank: int, port: int, hf_dir, ckpt):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    main(["import", str(hf_dir), str(ckpt), "--ep", "2"])


def test_import_ep2_export_world1(hf_dir, tmp_path):
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_import_ep2, args=(free_port(), hf_dir, tmp_path / "ckpt_ep2"), nprocs=2, join=True)
    assert json.loads((tmp_path / "ckpt_ep2" / "omni_train.json").read_text())["layout"]["ep"] == 2
    os.environ.pop("RANK", None), os.environ.pop("WORLD_SIZE", None), os.environ.pop("MASTER_PORT", None)
    main(["export", str(tmp_path / "ckpt_ep2"), str(tmp_path / "hf_out")])
    assert_identical(tmp_path / "hf_out", hf_dir)


def _broken_copy(hf_dir, dest, edit):
    """A single-file copy of the HF dir with ``edit(tensors, config)`` applied."""
    dest.mkdir()
    tensors, config = read_all(hf_dir), json.loads((hf_dir / "config.json").read_text())
    edit(tensors, config)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(config))
    return dest


EXPERT = "thinker.model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.mark.parametrize("case, match", [
    ("missing", f"tensor '{EXPERT}' is missing"),
    ("shape", r"tensor 'thinker.model.layers.0.self_attn.k_proj.weight' has shape \[16, 32\], "
              r"the config implies \[32, 32\]"),
    ("architecture", "unsupported architecture: config.json field 'architectures' is "
                     r"\['Qwen3OmniMoeThinkerForConditionalGeneration'\]"),
    ("field", "text_config.tie_word_embeddings=True is not supported"),
])
def test_import_errors_name_the_culprit(megatron_world1, hf_dir, tmp_path, case, match):
    def edit(tensors, config):
        if case == "missing":
            del tensors[EXPERT]
        if case == "shape":
            name = "thinker.model.layers.0.self_attn.k_proj.weight"
            tensors[name] = tensors[name][:16].clone()
        if case == "architecture":
            config["architectures"] = ["Qwen3OmniMoeThinkerForConditionalGeneration"]
        if case == "field":
            config["thinker_config"]["text_config"]["tie_word_embeddings"] = True

    broken = _broken_copy(hf_dir, tmp_path / "broken", edit)
    with pytest.raises(ValueError, match=match):
        import_hf(broken, tmp_path / "ckpt", ParallelConfig())


def test_export_names_missing_checkpoint_tensor(megatron_world1, hf_dir, tmp_path):
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", ParallelConfig())
    config = json.loads((ckpt / "config.json").read_text())
    config["thinker_config"]["text_config"]["num_hidden_layers"] = 3  # checkpoint holds 2
    (ckpt / "config.json").write_text(json.dumps(config))
    match = r"checkpoint tensor 'decoder.layers.[a-z_.]+' has shape \[2, 32\], the config implies \[3, 32\]"
    with pytest.raises(ValueError, match=match):
        export_hf(ckpt, tmp_path / "out")


def test_qwen3_moe_import_export(megatron_world1, hf_dir, tmp_path):
    """A Qwen3-MoE LM (model.layers.N..., lm_head) into the Thinker LM alone and back."""
    src = tmp_path / "qwen3_moe"
    src.mkdir()
    full = json.loads((hf_dir / "config.json").read_text())
    text = dict(full["thinker_config"]["text_config"], architectures=["Qwen3MoeForCausalLM"],
                model_type="qwen3_moe")
    text["rope_parameters"] = dict(rope_type="default", rope_theta=10000.0)
    (src / "config.json").write_text(json.dumps(text))
    tensors = {n.replace("thinker.model.", "model.").replace("thinker.lm_head.", "lm_head."): t
               for n, t in read_all(hf_dir).items() if n.startswith(("thinker.model.", "thinker.lm_head."))}
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    ckpt = import_hf(src, tmp_path / "ckpt", ParallelConfig(), source="qwen3_moe")
    out = export_hf(ckpt, tmp_path / "out")
    got = read_all(out)
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
