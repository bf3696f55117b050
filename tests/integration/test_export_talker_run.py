"""A Talker trained from scratch, given a new voice and exported: talker_pretrain (the posttrain tests' run), then
speaker_finetune through the real CLI with a new voice `nova` (codec id 2304: the first free one) and weight decay
on. The codec embedding (every other speaker's row, every code's row) stays bit for bit the pre-stage one while the
voice's row and the rest of the Talker train; a resumed run repeats its losses bitwise; `omni-convert export` writes
a whole Qwen3OmniMoeForConditionalGeneration (Thinker, Talker, Code2Wav) that transformers loads with nothing
missing, whose talker_config.speaker_id names the voice, whose Talker gives our checkpoint's codec and residual
logits on a sequence that holds the voice, and whose generate(speaker="nova", return_audio=True) speaks."""

import json
import shutil

import numpy as np
import pytest
import torch

from cli import metrics, omni_train, run_module
from tests.conftest import TALKER_STEPS
from tests.integration.test_multimodal_stage import _rerun_from
from tests.posttrain.test_talker_stages import _tensors

VOICE, VOICE_ID, STEPS = "nova", 2304, 4  # a new voice: the first free codec id above 2301-2303
TABLE = "talker.backbone.embedding.word_embeddings.weight"


def _overrides(root, pretrain_dir, run_dir, *extra):
    return ["recipe=tiny/speaker_finetune", f"run_dir={run_dir}", f"init_from={pretrain_dir / 'checkpoints'}",
            f"stage.speaker.name={VOICE}", f"data.tokenizer={root / 'tokenizer'}",
            f"data.datasets=[{{path: {root / 'speech'}, weight: 1.0}}]", f"trainer.max_steps={STEPS}",
            "checkpoint.save_every=2", *extra]


@pytest.fixture(scope="module")
def voice_run(pretrain_run, speech_root, tmp_path_factory):
    """(run dir, overrides, stdout): speaker_finetune from talker_pretrain's final checkpoint, a new voice."""
    pretrain_dir, _, _ = pretrain_run
    run_dir = tmp_path_factory.mktemp("voice") / "speaker_finetune"
    overrides = _overrides(speech_root, pretrain_dir, run_dir)
    proc = omni_train(overrides)
    return run_dir, overrides, proc.stdout


@pytest.fixture(scope="module")
def export(voice_run, tmp_path_factory):
    run_dir, _, _ = voice_run
    out = tmp_path_factory.mktemp("voice_export") / "hf"
    proc = run_module("omni_train.export.convert", ["export", run_dir / "checkpoints", out], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no talker / code2wav exported" not in proc.stdout
    return out


def test_the_voice_trains_and_every_other_codec_row_stays(voice_run, pretrain_run):
    run_dir, _, stdout = voice_run
    assert f"voice '{VOICE}' (codec id {VOICE_ID}) started as the mean of aiden, chelsie, ethan" in stdout
    records = metrics(run_dir)
    assert sorted(records) == list(range(1, STEPS + 1)) and all(np.isfinite(r["loss"]) for r in records.values())
    assert records[STEPS]["loss"] < records[1]["loss"] - 0.5
    before = _tensors(pretrain_run[0] / "checkpoints" / f"step_{TALKER_STEPS:08d}", lambda k: k.startswith("talker."))
    after = _tensors(run_dir / "checkpoints" / f"step_{STEPS:08d}",
                     lambda k: k.startswith(("talker.", "voice.", "optimizer.state.exp_avg.")))
    assert int(after[f"voice.{VOICE}.id"]) == VOICE_ID
    row, table = after[f"voice.{VOICE}.row"], after[TABLE]
    others = torch.arange(table.shape[0]) != VOICE_ID
    assert torch.equal(table[others], before[TABLE][others])  # weight decay 0.1 never reached them
    assert torch.equal(table[VOICE_ID], row)  # the voice's row, written into the saved table
    start = before[TABLE][[2301, 2302, 2303]].mean(0)
    assert not torch.allclose(row, start, atol=1e-4)  # trained away from its start
    head = "talker.code_predictor.lm_head.0.weight"
    assert not torch.equal(after[head], before[head])  # the rest of the Talker trains
    # the finished stage speaks (stage.audio_samples) with the voice
    samples = [json.loads(line) for line in (run_dir / "audio" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(r["speaker"] == VOICE_ID for r in samples)
    moments = {k for k in after if k.startswith("optimizer.state.exp_avg.")}
    assert f"optimizer.state.exp_avg.voice.{VOICE}.row" in moments
    assert not any(k.startswith("optimizer.state.exp_avg.talker.backbone.embedding") for k in moments)


def test_a_resumed_voice_run_repeats_the_losses_bitwise(voice_run, tmp_path):
    run_dir, overrides, _ = voice_run
    again = tmp_path / "resumed"
    shutil.copytree(run_dir, again)
    _rerun_from(again, 2)
    omni_train([o for o in overrides if not o.startswith("run_dir=")] + [f"run_dir={again}"])
    lines = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 3, 4]
    for first, repeat in zip(lines[2:4], lines[4:]):
        for key in ("loss", "loss_codec0", "loss_residual", "grad_norm"):
            assert repeat[key] == first[key], (first["step"], key)
    final = "checkpoints/step_00000004"
    assert torch.equal(_tensors(again / final, lambda k: k.startswith("voice."))[f"voice.{VOICE}.row"],
                       _tensors(run_dir / final, lambda k: k.startswith("voice."))[f"voice.{VOICE}.row"])


def test_the_export_speaks_with_the_voice(export, voice_run, pretrain_run, megatron_world1):
    from megatron.core import dist_checkpointing
    from transformers import Qwen3OmniMoeForConditionalGeneration

    from omni_train.checkpoint import safe_load
    from omni_train.config.schema import ParallelConfig
    from omni_train.data.chat import ChatEncoder
    from omni_train.export.generate import encode_prompt
    from omni_train.export.talker import audio_output_config
    from omni_train.export.verify_talker import build_probe, reference_outputs, talker_outputs
    from omni_train.models.talker.model import build_talker

    run_dir, _, _ = voice_run
    config = json.loads((export / "config.json").read_text())
    assert config["enable_audio_output"] is True
    assert config["talker_config"]["speaker_id"] == {"chelsie": 2301, "ethan": 2302, "aiden": 2303, VOICE: VOICE_ID}
    model, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(export, local_files_only=True,
                                                                       output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    model = model.float().eval()
    step = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    exported = model.talker.get_input_embeddings().weight
    assert torch.equal(exported, _tensors(step, lambda k: k == TABLE)[TABLE])
    before = _tensors(pretrain_run[0] / "checkpoints" / f"step_{TALKER_STEPS:08d}", lambda k: k == TABLE)[TABLE]
    assert torch.equal(exported[2301:2304], before[2301:2304])  # the other voices, bit for bit
    assert not torch.equal(exported[VOICE_ID], before[VOICE_ID])
    # our Talker (the checkpoint's talker.* as a plain Talker reads them) vs transformers' on a sequence whose
    # context holds the voice's token
    cfg = audio_output_config(config)
    ours = build_talker(cfg, ParallelConfig(), device="cpu", params_dtype=torch.float32).eval()
    safe_load.apply()
    loaded = dist_checkpointing.load(ours.sharded_state_dict(prefix="talker."), str(step))
    ours.load_state_dict({k[len("talker."):]: v for k, v in loaded.items() if k.startswith("talker.")})
    probe = build_probe(cfg, config["code2wav_config"])
    probe.context_codes[6] = VOICE_ID
    with torch.no_grad():
        got, want = talker_outputs(ours, probe), reference_outputs(model, probe)
    for kind in ("talker_codec0", "talker_residual"):
        assert (got[kind] - want[kind]).abs().max().item() <= 1e-5, kind
    # transformers' generate with the new voice: Thinker, Talker, Code2Wav
    encoder = ChatEncoder.from_pretrained(str(export))
    input_ids, _ = encode_prompt(encoder, "Say something.")
    torch.manual_seed(0)
    sequences, wav = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), speaker=VOICE,
                                    return_audio=True, thinker_max_new_tokens=3, thinker_do_sample=False,
                                    thinker_eos_token_id=encoder.ids["im_end"], talker_max_new_tokens=4)
    assert sequences.shape[1] > input_ids.shape[1]
    assert wav.ndim == 3 and wav.shape[-1] > 0 and torch.isfinite(wav).all()
    with pytest.raises(NotImplementedError):
        model.generate(input_ids=input_ids, speaker="nobody", return_audio=True, thinker_max_new_tokens=1)


def _data(root):
    return [f"data.tokenizer={root / 'tokenizer'}", f"data.datasets=[{{path: {root / 'speech'}}}]"]


@pytest.mark.parametrize("override, key, words", [
    ("stage.speaker.name=my.voice", "stage.speaker.name", "must be a lowercase word"),
    ("stage.speaker.name=Nova", "stage.speaker.name", "lowercased"),
    ("stage.speaker.id=2302", "stage.speaker.id", "taken by 'ethan'"),
    ("stage.speaker.id=2150", "stage.speaker.id", "taken by 'codec.eos'"),
    ("stage.speaker.id=100", "stage.speaker.id", "outside 2048..3071"),
    ("stage.speaker.init=bob", "stage.speaker.init", "neither 'mean' nor one of"),
])
def test_a_bad_voice_is_refused_by_key(speech_root, override, key, words):
    from omni_train.config import ConfigError, compose, validate_config

    cfg = compose(["recipe=tiny/speaker_finetune", override, *_data(speech_root)])
    with pytest.raises(ConfigError) as error:
        validate_config(cfg, world_size=1, cuda_available=False)
    assert error.value.key == key and words in error.value.problem


def test_the_voice_name_is_required(speech_root):
    from omni_train.config import ConfigError, compose, validate_config

    cfg = compose(["recipe=tiny/speaker_finetune", "stage.speaker.name=???", *_data(speech_root)])
    with pytest.raises(ConfigError) as error:
        validate_config(cfg, world_size=1, cuda_available=False)
    assert error.value.key == "stage.speaker.name"


def test_voice_ids():
    from omni_train.config.talker import SpeakerConfig, TalkerConfig
    from omni_train.config.validate import speaker_codec_id

    talker = TalkerConfig()
    assert speaker_codec_id(SpeakerConfig(name="nova"), talker) == 2304
    assert speaker_codec_id(SpeakerConfig(name="ethan"), talker) == 2302  # refined at its own id
    assert speaker_codec_id(SpeakerConfig(name="nova", id=2500), talker) == 2500
    talker.codec.speakers = {"last": 3071}
    assert speaker_codec_id(SpeakerConfig(name="nova"), talker) == 2048  # none above: the lowest free one


def test_an_imported_config_names_the_voice(tmp_path):
    """Export of a run trained from an import copies the import's config.json: the voice is added to it."""
    from omni_train.export.talker import add_voices

    path = tmp_path / "config.json"
    path.write_text(json.dumps({"enable_audio_output": True, "talker_config": {"speaker_id": {"ethan": 2302}}}))
    add_voices(path, {VOICE: VOICE_ID})
    assert json.loads(path.read_text())["talker_config"]["speaker_id"] == {"ethan": 2302, VOICE: VOICE_ID}
    path.write_text(json.dumps({"enable_audio_output": False}))
    add_voices(path, {VOICE: VOICE_ID})
    assert json.loads(path.read_text()) == {"enable_audio_output": False}
