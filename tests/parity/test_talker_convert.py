"""omni-convert with the Talker: a tiny full Qwen3-Omni with audio output (thinker, towers, talker, code
predictor, code2wav; sizes no other test uses) through import -> our checkpoint -> export.

1. Import at world size 1 and at ep=2 (two gloo processes) writes the Talker as real checkpoint keys (layer
   and expert axes; nothing of it carried), export gives every tensor back bit-identical; at ep=2 each rank
   loads its half of the experts from the import and gives transformers' Talker outputs.
   ``omni-convert verify --ep 2`` passes there too.
2. Train the imported Thinker LM and Talker a few steps (torch AdamW, the Talker's teacher-forced loss), save
   as the loop does (CheckpointManager), export, reload in transformers: no missing or unexpected keys,
   codebook-0 / residual / thinker logits equal our trained models', what was trained differs from the
   import and the rest does not, and ``generate(return_audio=True)`` returns a waveform. A Talker-only
   checkpoint whose import carries the talker as opaque tensors (as imports did before the Talker existed)
   exports the trained Talker and the rest from that import.
3. ``omni-convert verify`` reports the Talker and Code2Wav; a corrupted Talker tensor fails naming it.

The transformers tiny model of tests/conftest.py (``tiny_hf_omni_dir``) holds a talker too, but one whose
codec vocabulary (64) our Talker refuses (codes must lie below codec_vocab - 1024): import carries it.
"""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from megatron.core import dist_checkpointing
from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

from cli import start
from omni_train.checkpoint.manager import CheckpointManager, TrainState, load_model_weights, read_provenance
from omni_train.config.schema import ParallelConfig
from omni_train.export import talker as audio_output
from omni_train.export import verify as verify_module
from omni_train.export import verify_talker
from omni_train.export.convert import export_hf, import_hf, main
from omni_train.export.talker import audio_output_config, load_talker
from omni_train.models.talker import conditioning as cond
from omni_train.models.thinker.bridge import model_config_from_hf
from omni_train.models.thinker.lm import build_thinker_lm
from tests.conftest import free_port
from tests.parity.test_convert import _broken_copy, assert_export_gives_our_logits, assert_identical, read_all

REPO = Path(__file__).resolve().parents[2]
H, TALKER_H, CODEBOOK, GROUPS = 36, 24, 48, 3
IDS = dict(audio=120, image=121, video=122, vision_start=123, audio_start=124, im_start=125, im_end=126,
           tts_pad=127, tts_bos=128, tts_eos=129, system=130, user=131, assistant=132)
EXPERTS_KEY = "talker.backbone.decoder.layers.mlp.experts.experts.linear_fc1.weight"


def tiny_config() -> Qwen3OmniMoeConfig:
    """Thinker: hidden 36, head dim 12, 4 experts (width 28) top-2. Talker: hidden 24, head dim 10, 4 experts
    (width 20) top-2 renormalised + shared expert 6, codec vocabulary 48 + 1024, 3 code groups; code predictor
    head dim 8. Expert widths are multiples of 4: grouped GEMMs want 16-byte strides."""
    text = dict(vocab_size=136, hidden_size=H, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                head_dim=12, moe_intermediate_size=28, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
                rope_parameters=dict(rope_type="default", rope_theta=20000.0, mrope_section=[2, 2, 2],
                                     interleaved=True))
    media_ids = dict(audio_token_id=IDS["audio"], image_token_id=IDS["image"], video_token_id=IDS["video"],
                     vision_start_token_id=IDS["vision_start"], audio_start_token_id=IDS["audio_start"])
    thinker = dict(text_config=text, audio_config=dict(d_model=12, encoder_layers=1, encoder_attention_heads=2,
                                                       encoder_ffn_dim=20, output_dim=H, n_window=6, num_mel_bins=12,
                                                       downsample_hidden_size=6),
                   vision_config=dict(depth=1, hidden_size=16, intermediate_size=20, num_heads=2, patch_size=4,
                                      out_hidden_size=H, deepstack_visual_indexes=[0]),
                   position_id_per_seconds=13, **media_ids)
    talker = dict(
        text_config=dict(vocab_size=CODEBOOK + 1024, hidden_size=TALKER_H, intermediate_size=18, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=10, moe_intermediate_size=20,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, shared_expert_intermediate_size=6,
                         decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
                         rope_parameters=dict(rope_type="default", rope_theta=30000.0, mrope_section=[3, 1, 1],
                                              interleaved=True)),
        code_predictor_config=dict(vocab_size=CODEBOOK, hidden_size=TALKER_H, intermediate_size=28, num_hidden_layers=1,
                                   num_attention_heads=3, num_key_value_heads=1, head_dim=8, num_code_groups=GROUPS,
                                   rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
        num_code_groups=GROUPS, thinker_hidden_size=H, accept_hidden_layer=1, spatial_merge_size=2,
        position_id_per_seconds=13, codec_pad_id=1050, codec_bos_id=1051, codec_eos_token_id=1052,
        codec_nothink_id=1053, codec_think_bos_id=1054, codec_think_eos_id=1055,
        speaker_id={"ethan": 1060, "aiden": 1061}, **media_ids)
    code2wav = dict(codebook_size=CODEBOOK, hidden_size=12, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=24, num_hidden_layers=1, num_quantizers=GROUPS, upsample_rates=[2, 3],
                    upsampling_ratios=[2], decoder_dim=12, sliding_window=6)
    top = {f"{k}_token_id": IDS[k] for k in ("im_start", "im_end", "tts_pad", "tts_bos", "tts_eos", "system", "user",
                                              "assistant")}
    return Qwen3OmniMoeConfig(thinker_config=thinker, talker_config=talker, code2wav_config=code2wav,
                              enable_audio_output=True, **top)


def tiny_model(seed: int = 0) -> Qwen3OmniMoeForConditionalGeneration:
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(tiny_config())
    with torch.no_grad():  # every tensor drawn (transformers leaves some empty), norms near 1
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name or ".ln_" in name else 0.2 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_talker_convert")
    tiny_model().save_pretrained(path, max_shard_size="150KB")  # several shards: the reader follows the index
    return path


def hf_config(hf_dir) -> dict:
    return json.loads((Path(hf_dir) / "config.json").read_text())


def probe(hf_dir) -> verify_talker.Probe:
    config = hf_config(hf_dir)
    return verify_talker.build_probe(audio_output_config(config), config["code2wav_config"])


def reference(hf_dir) -> dict:
    """transformers' Talker and Code2Wav outputs on the verify probe, loaded from ``hf_dir`` in fp32."""
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        hf_dir, dtype=torch.float32, local_files_only=True, experts_implementation="eager").eval()
    return verify_talker.reference_outputs(model, probe(hf_dir))


def max_diffs(ours: dict, ref: dict) -> dict:
    out = {}
    for kind in ("talker_codec0", "talker_residual"):
        assert ours[kind].shape == ref[kind].shape, kind
        out[kind] = (ours[kind] - ref[kind]).abs().max().item()
    return out


# ----- 1. round trips ----------------------------------------------------------------------------------


def test_import_world1_holds_the_talker_and_exports_identical(megatron_world1, hf_dir, tmp_path):
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", ParallelConfig())
    metadata = dist_checkpointing.load_tensors_metadata(str(ckpt))
    assert not [k for k in metadata if k.startswith(("carried.talker.", "carried.code2wav."))]
    assert tuple(metadata[EXPERTS_KEY].global_shape) == (2, 4, 2 * 20, TALKER_H)  # [layers, experts, fc1]
    assert "talker.code_predictor.lm_head.1.weight" in metadata and "code2wav.model.code_embedding.weight" in metadata
    assert json.loads((ckpt / "omni_train.json").read_text())["audio_output"] == "talker"
    out = export_hf(ckpt, tmp_path / "hf_out", max_shard_bytes=150_000)
    assert_identical(out, hf_dir)
    assert sum(n.startswith(("talker.", "code2wav.")) for n in read_all(out)) > 50


def ep2_worker(rank: int, ports, hf_dir: str, ckpt: str, result: str) -> None:
    """One of two processes: `omni-convert import --ep 2`; its Talker at ep=2 loaded from the import (2 of
    the 4 experts) on the verify probe; `omni-convert verify --ep 2`."""
    from omni_train.parallel.setup import init_parallel, shutdown_parallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank), WORLD_SIZE="2")
    main(["import", hf_dir, ckpt, "--ep", "2"])  # sets up and tears down its own process group
    os.environ["MASTER_PORT"] = str(ports[1])  # a fresh rendezvous for each process group
    init_parallel(ParallelConfig(ep=2, backend="gloo"), torch.device("cpu"), seed=0)
    try:
        talker = load_talker(Path(ckpt), ParallelConfig(ep=2)).eval()
        experts = talker.backbone.decoder.layers[0].mlp.experts
        outputs = verify_talker.talker_outputs(talker, probe(hf_dir))
        torch.save(dict(outputs, local_experts=experts.num_local_experts), Path(result) / f"rank{rank}.pt")
    finally:
        shutdown_parallel()
    os.environ["MASTER_PORT"] = str(ports[2])
    main(["verify", hf_dir, "--ep", "2"])


def test_import_ep2_gives_the_talker_and_exports_identical(megatron_world1, hf_dir, tmp_path):
    """Two gloo processes forked from the test fork server (tests/cli.py: torch and megatron already
    imported): import at ep=2, the Talker loaded at ep=2, verify at ep=2 (each rank checks its experts)."""
    ports, ckpt = [free_port() for _ in range(3)], tmp_path / "ckpt_ep2"
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'tests')!r}); "
            "from tests.parity.test_talker_convert import ep2_worker; "
            "ep2_worker(int(sys.argv[1]), [int(p) for p in sys.argv[2:5]], *sys.argv[5:])")
    procs = [start(["-c", code, rank, *ports, hf_dir, ckpt, tmp_path], tmp_path / f"out{rank}", tmp_path / f"err{rank}",
                   threads=1)
             for rank in (0, 1)]
    for rank, proc in enumerate(procs):
        assert proc.wait(timeout=300) == 0, (tmp_path / f"err{rank}").read_text()[-3000:]
    marker = json.loads((ckpt / "omni_train.json").read_text())
    assert marker["layout"]["ep"] == 2 and marker["audio_output"] == "talker"
    export_hf(ckpt, tmp_path / "hf_out")
    assert_identical(tmp_path / "hf_out", hf_dir)

    ref = reference(hf_dir)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["local_experts"] == 2
        diffs = max_diffs(got, ref)
        print(f"\n[talker ep=2 rank {rank}] max |diff| vs transformers {diffs}")
        assert all(d <= 1e-5 for d in diffs.values()), diffs
    printed = (tmp_path / "out0").read_text().splitlines()  # import's line, then verify's table
    verified = printed[next(i for i, line in enumerate(printed) if line.startswith("omni-convert verify: ")):]
    assert "tp=1 ep=2" in verified[0] and verified[-1].startswith("omni-convert verify: OK (")
    assert [line.split()[0] for line in verified[1:-1]] == list(verify_module.KINDS) + list(verify_talker.KINDS)
    assert (tmp_path / "out1").read_text() == ""  # rank 0 alone prints


# ----- 2. train, export, reload --------------------------------------------------------------------------


def conversation(gen, reply: int) -> torch.Tensor:
    """A user turn with an audio (4 placeholders), then the assistant's reply and <|im_end|>."""
    i = IDS
    words = lambda n: torch.randint(0, 100, (n,), generator=gen).tolist()  # noqa: E731
    return torch.tensor([i["im_start"], i["system"], *words(2), i["im_end"], 10,
                         i["im_start"], i["user"], *words(2), i["audio_start"], *[i["audio"]] * 4, *words(1), i["im_end"],
                         10, i["im_start"], i["assistant"], 10, *words(reply), i["im_end"], 10])


def talker_batch(gen):
    samples = []
    for reply, frames in ((5, 6), (3, 4)):  # two lengths: right padding
        ids = conversation(gen, reply)
        embeds = torch.randn(len(ids), H, generator=gen)
        codes = torch.randint(0, CODEBOOK, (frames, GROUPS), generator=gen)
        samples.append(cond.TalkerSample(ids, embeds, torch.randn(len(ids), H, generator=gen),
                                         torch.randn(3, H, generator=gen), codes, "ethan"))
    return samples


class Joint(torch.nn.Module):
    """The Thinker LM and the Talker saved in one checkpoint: the LM's keys as a Thinker run writes them, the
    Talker's under ``talker.`` (export/talker.py)."""

    def __init__(self, lm, talker):
        super().__init__()
        self.lm, self.talker = lm, talker

    def sharded_state_dict(self):
        return {**self.lm.sharded_state_dict(), **self.talker.sharded_state_dict(prefix="talker.")}


def train(model, loss_fn, steps: int = 3):
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_train_export_reload_generate(megatron_world1, hf_dir, tmp_path, monkeypatch):
    imported = import_hf(hf_dir, tmp_path / "imported", ParallelConfig())
    gen = torch.Generator().manual_seed(7)
    talker = load_talker(imported, ParallelConfig())
    batch = talker_batch(gen)
    talker_losses = train(talker, lambda: talker(batch)["loss"])
    lm = build_thinker_lm(model_config_from_hf(hf_config(hf_dir)["thinker_config"]["text_config"]), ParallelConfig(),
                          device="cpu", params_dtype=torch.float32)
    load_model_weights(imported, lm)
    tokens = torch.randint(0, 100, (2, 10), generator=gen)
    positions = torch.arange(10).expand(2, 10)
    lm_losses = train(lm, lambda: F.cross_entropy(lm(tokens[:, :-1], positions[:, :-1], None).flatten(0, 1),
                                                  tokens[:, 1:].flatten()), steps=2)
    assert talker_losses[-1] < talker_losses[0] and lm_losses[-1] < lm_losses[0], (talker_losses, lm_losses)

    manager = CheckpointManager(tmp_path / "run" / "checkpoints", keep_last=1)
    manager.provenance = read_provenance(imported)
    stub = SimpleNamespace(state_dict=dict)  # scheduler, data: nothing to keep here
    saved = manager.save(Joint(lm, talker), None, stub, TrainState(step=3), stub)
    out = export_hf(tmp_path / "run" / "checkpoints", tmp_path / "export")

    original, exported = read_all(hf_dir), read_all(out)
    assert exported.keys() == original.keys() and hf_config(out) == hf_config(hf_dir)
    assert hf_config(out)["enable_audio_output"] is True
    changed = {n for n in original if not torch.equal(original[n], exported[n])}
    trained = {n for n in original if n.startswith(("talker.", "thinker.model.", "thinker.lm_head."))}
    assert changed == trained, (sorted(trained - changed)[:5], sorted(changed - trained)[:5])

    reloaded, info = Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, local_files_only=True, experts_implementation="eager", output_loading_info=True)
    assert not any(info.values()), info
    reloaded.eval()
    with torch.no_grad():
        diffs = max_diffs(verify_talker.talker_outputs(talker.eval(), probe(out)),
                          verify_talker.reference_outputs(reloaded, probe(out)))
    print(f"\n[talker trained -> export -> transformers] max |diff| {diffs}; losses talker {talker_losses} "
          f"lm {lm_losses}")
    assert all(d <= 1e-5 for d in diffs.values()), diffs
    assert_export_gives_our_logits(out, saved)

    prompt = torch.tensor([[IDS["im_start"], IDS["user"], 5, 6, 7, IDS["im_end"], 10, IDS["im_start"],
                            IDS["assistant"], 10]])
    with torch.no_grad():
        sequences, wav = reloaded.generate(input_ids=prompt, return_audio=True, speaker="ethan",
                                           thinker_max_new_tokens=3, thinker_do_sample=False,
                                           thinker_eos_token_id=None, talker_max_new_tokens=4, talker_do_sample=False)
    print(f"[talker generate] sequences {tuple(sequences.shape)}, waveform {tuple(wav.shape)}")
    assert isinstance(wav, torch.Tensor) and wav.dim() == 3 and wav.shape[-1] > 0 and torch.isfinite(wav).all()

    # A Talker-only checkpoint (CheckpointManager saving the Talker as the model: keys without "talker.")
    # exports the trained Talker and the rest from the import it names, here one written before the Talker
    # existed (talker and code2wav as carried.<HF name>): the trained Talker wins over the carried one.
    monkeypatch.setattr(audio_output, "plan_audio_output", lambda *args: audio_output.AudioOutput(
        carried_reason="an import written before omni-convert had a Talker"))
    old_import = import_hf(hf_dir, tmp_path / "old_import", ParallelConfig())
    assert any(k.startswith("carried.talker.") for k in dist_checkpointing.load_tensors_metadata(str(old_import)))
    alone = CheckpointManager(tmp_path / "talker_run" / "checkpoints", keep_last=1)
    alone.provenance = read_provenance(old_import)
    alone.save(talker, None, stub, TrainState(step=3), stub)
    second = read_all(export_hf(tmp_path / "talker_run" / "checkpoints", tmp_path / "export_talker_only"))
    assert second.keys() == original.keys()
    for name, tensor in second.items():
        want = exported[name] if name.startswith(("talker.", "code2wav.")) else original[name]
        assert torch.equal(tensor, want), name


# ----- 3. verify ---------------------------------------------------------------------------------------


@pytest.fixture
def clean_env():
    """main() sets up and tears down its own process group; keep its variables out of later tests."""
    keys = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_verify_reports_talker_and_code2wav(hf_dir, clean_env, capsys):
    main(["verify", str(hf_dir)])
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out if line.startswith("  ")}
    assert list(rows) == list(verify_module.KINDS) + list(verify_talker.KINDS), out
    for kind in verify_talker.KINDS:
        assert float(rows[kind][3]) <= 1e-4, rows[kind]
    assert rows["code2wav"][-4] == "waveform"
    assert out[-1].startswith("omni-convert verify: OK (text, audio, image, video, audio_in_video, talker_codec0, "
                              "talker_residual, code2wav within")
    print("\n".join(out))


def test_verify_names_a_corrupted_talker_tensor(hf_dir, clean_env, monkeypatch):
    """One routed expert's tensor 1% off in our import (transformers reads the directory itself)."""
    target = "talker.model.layers.1.mlp.experts.3.down_proj.weight"
    get = verify_module.HFReader.get
    monkeypatch.setattr(verify_module.HFReader, "get",
                        lambda self, name: get(self, name) * (1.01 if name == target else 1.0))
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", str(hf_dir)])
    message = exit_info.value.code
    print(f"\n{message}")
    assert isinstance(message, str) and f"talker tensors differ from transformers': {target!r}" in message
    assert " text (" not in message  # the Thinker is untouched


@pytest.mark.parametrize("case, match", [
    ("missing", "tensor 'talker.code_predictor.lm_head.1.weight' is missing from the HF checkpoint"),
    ("shape", r"tensor 'talker.model.layers.1.mlp.experts.2.up_proj.weight' has shape \[10, 24\], the talker "
              r"config implies \[20, 24\]"),
    ("unknown", "tensor 'talker.model.layers.0.mlp.extra.weight' has no row in the Talker table"),
])
def test_import_errors_name_the_talker_tensor(megatron_world1, hf_dir, tmp_path, case, match):
    def edit(tensors, config):
        if case == "missing":
            del tensors["talker.code_predictor.lm_head.1.weight"]
        if case == "shape":
            name = "talker.model.layers.1.mlp.experts.2.up_proj.weight"
            tensors[name] = tensors[name][:10].clone()
        if case == "unknown":
            tensors["talker.model.layers.0.mlp.extra.weight"] = torch.zeros(2)

    with pytest.raises(ValueError, match=match):
        import_hf(_broken_copy(hf_dir, tmp_path / "broken", edit), tmp_path / "ckpt", ParallelConfig())


def test_layouts_the_talker_refuses_are_named():
    cfg = audio_output_config(tiny_config().to_dict())
    assert audio_output.layout_problem(cfg, ParallelConfig(tp=2, sequence_parallel=True)).startswith(
        "our Talker runs at tp = pp = cp = 1 only (build_talker refuses tp=2 pp=1 cp=1); import with --tp 1")
    assert audio_output.layout_problem(cfg, ParallelConfig(pp=2)) is not None
    assert audio_output.layout_problem(cfg, ParallelConfig(ep=3)) == "the Talker's 4 experts do not split over ep=3"


def test_conftest_talker_is_carried(megatron_world1, tiny_hf_omni_dir, tmp_path, capsys):
    """tests/conftest.py's tiny model: a talker our Talker refuses (codec vocabulary 64) is carried unchanged,
    the reason printed and kept in the marker; load_talker names it."""
    ckpt = import_hf(tiny_hf_omni_dir, tmp_path / "ckpt", ParallelConfig())
    note = json.loads((ckpt / "omni_train.json").read_text())["audio_output"]
    assert note.startswith("carried: talker config: code_predictor.codebook_size") and note[9:] in capsys.readouterr().err
    assert any(k.startswith("carried.talker.") for k in dist_checkpointing.load_tensors_metadata(str(ckpt)))
    with pytest.raises(ValueError, match="holds no Talker to train"):
        load_talker(ckpt, ParallelConfig())

