"""A run trained from scratch (tiny_omni with towers on synth shards, the real CLI, no HF import) exports
to the Qwen3-Omni layout: the HF config comes from the run's config.yaml, no talker / code2wav is written,
transformers loads the export and its tokenizer, the exported thinker gives our checkpoint's logits on a
prompt with an image and an audio clip, and its greedy generation is our model's argmax loop."""

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from megatron.core import dist_checkpointing
from omegaconf import OmegaConf
from PIL import Image
from transformers import AutoTokenizer, Qwen3OmniMoeForConditionalGeneration

from cli import run_module
from omni_train.checkpoint.manager import MARKER, latest_checkpoint, load_model_weights
from omni_train.config.schema import ThinkerConfig, ParallelConfig
from omni_train.data.chat import ChatEncoder
from omni_train.export.convert import export_hf, main
from omni_train.export.generate import encode_prompt, generate_ids, generate_text, load_export
from omni_train.export.hf_io import HFReader
from omni_train.models.thinker.omni import build_omni_thinker
from omni_train.models.thinker.hf_config import hf_thinker_config
from tests.conftest import redraw_weights

PROMPT = "What do you hear and see?"
NEW_TOKENS = 5


@pytest.fixture(scope="module")
def trained(multimodal_run, tmp_path_factory):
    """(run dir, export dir): the session's multimodal_pretrain run from scratch (tests/conftest.py: 3
    steps on synth shards, step 3 redone after a resume), exported by the CLI."""
    run_dir, _ = multimodal_run
    root = tmp_path_factory.mktemp("scratch")
    assert "hf_source" not in json.loads((latest_checkpoint(run_dir / "checkpoints") / MARKER).read_text())
    proc = run_module("omni_train.export.convert", ["export", run_dir / "checkpoints", root / "hf"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no talker / code2wav exported (enable_audio_output=false)" in proc.stdout
    return run_dir, root / "hf"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """An image file and a 1.2 s audio file, as a user would pass them."""
    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(root / "image.png")
    t = np.arange(int(1.2 * 16000)) / 16000
    sf.write(root / "audio.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    return root / "image.png", root / "audio.wav"


def our_thinker(run_dir, encoder):
    """Our OmniThinker as the stage builds it, with the run's final checkpoint loaded."""
    loaded = OmegaConf.load(run_dir / "config.yaml").model.thinker
    model_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ThinkerConfig), loaded))
    model = build_omni_thinker(hf_thinker_config(model_cfg, encoder.ids), model_cfg, ParallelConfig(),
                               device="cpu", params_dtype=torch.float32)
    load_model_weights(latest_checkpoint(run_dir / "checkpoints"), model)
    return model.eval()


@torch.no_grad()
def argmax_loop(model, encoder, input_ids, towers, items, steps):
    """Greedy decoding with our model, a full forward per step, TM-RoPE ids from the chat encoder;
    returns (new ids [steps], each step's next-token logits [steps, V])."""
    ids, step_logits = input_ids[0], []
    for _ in range(steps):
        positions = encoder.position_ids(ids, items)[:, None]  # [3, 1, n]
        step_logits.append(model(ids[None], positions, None, **towers)[0, -1])
        ids = torch.cat([ids, step_logits[-1].argmax()[None]])
    return ids[input_ids.shape[1]:], torch.stack(step_logits)


def test_export_is_a_thinker_without_talker(trained):
    run_dir, hf = trained
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["Qwen3OmniMoeForConditionalGeneration"]
    assert config["enable_audio_output"] is False
    text = config["thinker_config"]["text_config"]
    assert (text["vocab_size"], text["num_hidden_layers"], text["num_experts"]) == (1024, 4, 8)
    names = HFReader(hf).names()
    assert all(n.startswith("thinker.") for n in names)
    assert {n.split(".")[1] for n in names} == {"model", "lm_head", "audio_tower", "visual"}
    model, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(hf, local_files_only=True,
                                                                       output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert not hasattr(model, "talker") and not hasattr(model, "code2wav")
    # the tokenizer came along, with a chat template giving the training layout
    encoder = ChatEncoder.from_pretrained(str(hf))
    tokenizer = AutoTokenizer.from_pretrained(hf)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                             return_dict=False)
    assert rendered == encode_prompt(encoder, PROMPT)[0][0].tolist()
    assert encoder.ids == ChatEncoder.from_pretrained(
        OmegaConf.load(run_dir / "config.yaml").data.tokenizer).ids


def _assert_export_matches(ours, hf, media):
    """The export's thinker gives our logits on an image + audio + text prompt, and its greedy generation
    (KV cache, its own rope index) is our argmax loop, step logits included; returns the new ids."""
    reloaded, encoder = load_export(hf)
    image, audio = media
    input_ids, towers = encode_prompt(encoder, PROMPT, image=image, audio=audio)
    assert {"pixel_values", "input_features"} <= towers.keys()
    sample = encoder.encode_messages(  # the same prompt, for its media items (positions of our model)
        [{"role": "user", "content": [{"type": "image", "image": "i"}, {"type": "audio", "audio": "a"},
                                      {"type": "text", "text": PROMPT}]}],
        dict(i=np.asarray(Image.open(image).convert("RGB")), a=sf.read(audio, dtype="float32")[0]),
        add_generation_prompt=True)
    assert torch.equal(sample.input_ids, input_ids[0])
    with torch.no_grad():
        ref = reloaded.thinker(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **towers).logits
        got = ours(input_ids, sample.position_ids[:, None], None, **towers)
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-4, diff

    expected, expected_logits = argmax_loop(ours, encoder, input_ids, towers, sample.media, NEW_TOKENS)
    got_ids = generate_ids(reloaded, encoder, input_ids, NEW_TOKENS, stop_at_eos=False, **towers)
    assert got_ids.tolist() == expected.tolist()
    with torch.no_grad():
        result = reloaded.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                   return_audio=False, thinker_max_new_tokens=NEW_TOKENS, thinker_eos_token_id=None,
                                   thinker_do_sample=False, thinker_output_logits=True,
                                   thinker_return_dict_in_generate=True, **towers)
    step_diff = (torch.cat(result.logits) - expected_logits).abs().max().item()
    assert len(result.logits) == NEW_TOKENS and step_diff <= 1e-4, step_diff
    return expected.tolist(), encoder


def test_logits_and_generation_equal_ours(megatron_world1, trained, media, capsys):
    run_dir, hf = trained
    encoder = ChatEncoder.from_pretrained(str(hf))
    expected, encoder = _assert_export_matches(our_thinker(run_dir, encoder), hf, media)
    image, audio = media
    eos = encoder.ids["im_end"]
    until_eos = expected[: expected.index(eos)] if eos in expected else expected
    text = generate_text(hf, PROMPT, NEW_TOKENS, image=image, audio=audio)
    assert text == encoder.tokenizer.decode(until_eos)
    no_stop = generate_text(hf, PROMPT, NEW_TOKENS, image=image, audio=audio, stop_at_eos=False)
    assert no_stop == encoder.tokenizer.decode(expected) and no_stop
    capsys.readouterr()
    main(["generate", str(hf), "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--image", str(image),
          "--audio", str(audio), "--no-stop"])
    assert capsys.readouterr().out == no_stop + "\n"


def test_redrawn_weights_export_exactly(megatron_world1, trained, media, tmp_path):
    """Three training steps leave the small init (outputs barely depend on positions or media), so the
    checkpoint's weights are re-drawn large (as the parity tests do) and saved as a step of a copy of
    the run: a wrong rope section, DeepStack index or tower size in the exported config now shows."""
    run_dir, hf = trained
    encoder = ChatEncoder.from_pretrained(str(hf))
    ours = our_thinker(run_dir, encoder)
    redraw_weights(ours, 0.2)
    copy = tmp_path / "run" / "redrawn"
    step = copy / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    dist_checkpointing.save({"model": ours.sharded_state_dict()}, str(step))
    (step / MARKER).write_text(json.dumps({"step": 2, "consumed_samples": 0}))
    shutil.copy(run_dir / "config.yaml", copy / "config.yaml")
    expected, _ = _assert_export_matches(ours, export_hf(copy / "checkpoints", tmp_path / "hf"), media)
    assert len(set(expected)) > 1, expected  # generation does not just repeat one token


def _fake_run(tmp_path, trained, edit):
    """A run dir with the trained run's config.yaml passed through ``edit`` and a marker-only checkpoint
    (export reads the run config before any tensor)."""
    run_dir = tmp_path / "run" / "stage"
    step = run_dir / "checkpoints" / "step_00000001"
    step.mkdir(parents=True)
    (step / MARKER).write_text(json.dumps({"step": 1, "consumed_samples": 0}))
    config = OmegaConf.load(trained[0] / "config.yaml")
    if edit(config) is not False:
        OmegaConf.save(config, run_dir / "config.yaml")
    return run_dir / "checkpoints"


@pytest.mark.parametrize("case, match", [
    ("text_only", r"model.thinker.towers=false: a text-only Thinker LM has no audio / vision towers"),
    ("no_tokenizer", r"data.tokenizer is not set"),
    ("missing_tokenizer", r"data.tokenizer=/nonexistent/tok is not a directory"),
    ("no_run_config", r"no HF provenance in its marker and no run config at .*config.yaml"),
    ("expert_bias", r"model.thinker.load_balancing='expert_bias' has no Hugging Face equivalent"),
])
def test_export_errors_name_what_is_missing(trained, tmp_path, case, match):
    def edit(config):
        if case == "text_only":
            config.model.thinker.towers = False
        if case == "no_tokenizer":
            config.data.tokenizer = None
        if case == "missing_tokenizer":
            config.data.tokenizer = "/nonexistent/tok"
        if case == "expert_bias":
            config.model.thinker.load_balancing = "expert_bias"
        return case != "no_run_config"

    ckpt_root = _fake_run(tmp_path, trained, edit)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        export_hf(ckpt_root, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_cli_errors_are_one_line(trained, tmp_path):
    ckpt_root = _fake_run(tmp_path, trained, lambda config: setattr(config.model.thinker, "towers", False))
    with pytest.raises(SystemExit, match=r"^omni-convert export: .*model.thinker.towers=false: [^\n]*$"):
        main(["export", str(ckpt_root), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"^omni-convert generate: .*: no config.json"):
        main(["generate", str(tmp_path), "--prompt", PROMPT])
