"""omni-data preference-pairs: every rule, margin, limit, weights and sign against hand-computed pairs;
skipped prompts counted and named; the pairs load through the trainer's reader and pass validate.

Talker prompt (manifest line 1): four speech candidates (text "cand i", audio, codec) scored
    wer  0.10 0.30 0.05 0.50      sim 0.80 0.90 0.50 0.70
so with --score wer --lower-is-better the ranking is 2 > 0 > 1 > 3 with gaps (2,3) .45, (0,3) .40,
(2,1) .25, (0,1) .20, (1,3) .20, (2,0) .05; --score sim ranks 1 > 0 > 3 > 2; --score wer:-1 --score sim:1
gives 0.70 0.60 0.45 0.20 (0 > 1 > 2 > 3).
"""

import json
import os

import numpy as np
import pytest
import soundfile

from data_pipelines import shards
from data_pipelines.cli import main
from omni_train.data.decode import decode_sample
from omni_train.data.stream import _iter_shard

WER, SIM = [0.10, 0.30, 0.05, 0.50], [0.80, 0.90, 0.50, 0.70]


def _user(text, audio=None):
    return {"role": "user", "content": ([{"type": "audio", "audio": audio}] if audio else [])
            + [{"type": "text", "text": text}]}


def _speech(i):
    return {"messages": [{"role": "assistant", "content": [
        {"type": "text", "text": f"cand {i}"}, {"type": "audio", "audio": f"c{i}.wav", "codec": f"c{i}.npy"}]}],
        "scores": {"wer": WER[i], "sim": SIM[i]}}


def _text(i, **scores):
    return {"messages": [{"role": "assistant", "content": f"cand {i}"}], "scores": scores}


def _same(n):
    return [_text(i, wer=0.1, sim=0.5) for i in range(n)]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """talker.jsonl (speech candidates, paths) and thinker/ (text candidates, built by omni-data build)."""
    root = tmp_path_factory.mktemp("pref")
    t = np.arange(3200) / 16000
    for i in range(4):
        soundfile.write(root / f"c{i}.wav", 0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t), 16000)
        np.save(root / f"c{i}.npy", np.full((3, 16), i, dtype=np.int32))
    soundfile.write(root / "q.wav", 0.3 * np.sin(2 * np.pi * 440 * t), 16000)
    np.save(root / "spk.npy", np.arange(8, dtype=np.float32))
    system = {"role": "system", "content": "Speak."}
    talker = [
        {"messages": [system, _user("Say it.", "q.wav"), {"role": "assistant", "content": "reference, dropped"}],
         "speaker": {"id": "spk_1", "embedding": "spk.npy"}, "meta": {"lang": "en"},
         "candidates": [_speech(i) for i in range(4)]},
        {"messages": [_user("One.")], "candidates": [_text(0, wer=0.1, sim=0.5)]},
        {"messages": [_user("Tie.")], "candidates": _same(3)},
        {"messages": [_user("Gap.")], "candidates": [_text(0, wer=0.1, sim=0.5), _text(1, sim=0.2)]},
        {"messages": [_user("Bad.")], "candidates": "not a list"},
        {"messages": [_user("Text.")], "candidates": [_text(0, wer=0.2, sim=0.5), _text(1, wer=0.0, sim=0.6),
                                                      _text(2, wer=0.4, sim=0.1)]},
    ]
    (root / "talker.jsonl").write_text("\n".join(json.dumps(e) for e in talker) + "\n\n")
    thinker = [
        {"messages": [_user("Hear this.", "q.wav")], "speaker": {"embedding": "spk.npy"},
         "candidates": [_text(0, wer=0.3, sim=0.2), _text(1, wer=0.1, sim=0.9), _text(2, wer=0.2, sim=0.1)]},
        {"messages": [_user("Missing.")], "candidates": [_text(0, wer=0.1, sim=0.1), _text(1, sim=0.3)]},
        {"messages": [_user("Fine.")], "candidates": [_text(0, wer=0.5, sim=0.1), _text(1, wer=0.4, sim=0.3)]},
    ]
    (root / "thinker.jsonl").write_text("".join(json.dumps(e) + "\n" for e in thinker))
    assert main(["build", str(root / "thinker.jsonl"), str(root / "thinker"), "--samples-per-shard", "2",
                 "--no-progress"]) == 0
    return root


def run_pairs(capsys, inp, out, *options):
    code = main(["preference-pairs", str(inp), str(out), "--samples-per-shard", "2", "--no-progress", *options])
    return code, capsys.readouterr().err


def read_pairs(out):
    """[(meta.line or meta.key, chosen, rejected, sample, members)] in shard order; chosen/rejected from the text."""
    pairs = []
    for entry in shards.read_index(out)["shards"]:
        for key, members in shards.iter_tar_samples(os.path.join(out, entry["name"])):
            sample = json.loads(members["json"])
            side = [_cand(sample["preference"][s]) for s in ("chosen", "rejected")]
            assert side == [sample["meta"]["pair"]["chosen"], sample["meta"]["pair"]["rejected"]]
            where = sample["meta"].get("line", sample["meta"].get("key"))
            pairs.append((where, side[0], side[1], sample, members))
    return pairs


def _cand(turns):
    content = turns[0]["content"]
    text = content if isinstance(content, str) else content[0]["text"]
    return int(text.split()[1])


def talker_pairs(pairs):
    return [(c, r) for where, c, r, _, _ in pairs if where == 1]


@pytest.mark.parametrize("options, expected", [
    (["--score", "wer", "--lower-is-better"], [(2, 3)]),
    (["--score", "wer", "--lower-is-better", "--rule", "best-vs-rest"], [(2, 3), (2, 1), (2, 0)]),
    (["--score", "wer", "--lower-is-better", "--rule", "all-pairs"], [(2, 3), (0, 3), (2, 1), (0, 1), (1, 3), (2, 0)]),
    (["--score", "wer:-1", "--rule", "all-pairs", "--min-margin", "0.2"], [(2, 3), (0, 3), (2, 1), (0, 1), (1, 3)]),
    (["--score", "wer", "--lower-is-better", "--rule", "all-pairs", "--max-pairs-per-prompt", "2"], [(2, 3), (0, 3)]),
    (["--score", "wer", "--lower-is-better", "--rule", "best-vs-rest", "--min-margin", "0.3"], [(2, 3)]),
    (["--score", "wer", "--lower-is-better", "--min-margin", "0.46"], []),
    (["--score", "sim"], [(1, 2)]),
    (["--score", "wer:-1", "--score", "sim:1"], [(0, 3)]),
    (["--score", "wer:-1", "--score", "sim", "--rule", "best-vs-rest"], [(0, 3), (0, 2), (0, 1)]),
])
def test_rules_choose_the_hand_computed_pairs(src, tmp_path, capsys, options, expected):
    code, err = run_pairs(capsys, src / "talker.jsonl", tmp_path / "out", *options)
    assert code == 0, err
    assert talker_pairs(read_pairs(tmp_path / "out")) == expected


def test_counts_and_named_bad_prompts(src, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_pairs(capsys, src / "talker.jsonl", out, "--score", "wer", "--lower-is-better")
    assert code == 0
    assert ("preference-pairs: 6 prompts read, 2 pairs written from 2 prompts; 4 prompts skipped (fewer than 2 "
            "candidates 1, no pair above the margin 1, missing score 1, bad sample 1); 0 pairs failed") in err
    assert "missing score: line 4: candidate 1 has no score 'wer'" in err
    assert "bad sample: line 5: `candidates` must be a list" in err
    report = [json.loads(l) for l in (out / "preference_report.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in report] == [
        (2, "fewer than 2 candidates"), (3, "no pair above the margin"), (4, "missing score"), (5, "bad sample")]
    assert [(w, c, r) for w, c, r, _, _ in read_pairs(out)] == [(1, 2, 3), (6, 1, 2)]
    assert run_pairs(capsys, src / "talker.jsonl", tmp_path / "strict", "--score", "wer", "--lower-is-better",
                     "--strict")[0] == 1
    # --score sim: line 4 pairs (0.5 vs 0.2); line 3 still ties
    code, err = run_pairs(capsys, src / "talker.jsonl", tmp_path / "sim", "--score", "sim")
    assert "3 pairs written from 3 prompts; 3 prompts skipped" in err and "missing score 0" in err


def test_speech_pairs_load_through_the_trainers_reader(src, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_pairs(capsys, src / "talker.jsonl", out, "--score", "wer", "--lower-is-better")[0] == 0
    where, chosen, rejected, sample, members = read_pairs(out)[0]
    assert sample["messages"] == [{"role": "system", "content": "Speak."}, _user("Say it.", "audio0.wav")]
    assert sample["speaker"] == {"id": "spk_1", "embedding": "spk.npy"} and "candidates" not in sample
    assert sample["meta"]["lang"] == "en" and sample["meta"]["source"] == "talker.jsonl"
    assert sample["meta"]["pair"]["scores"] == [-0.05, -0.5] and sample["meta"]["pair"]["gap"] == 0.45
    raw = next(_iter_shard(str(out / shards.read_index(out)["shards"][0]["name"])))
    decoded = decode_sample(raw)
    assert decoded["__key__"] == "s00000000"
    for side, cand in (("chosen", 2), ("rejected", 3)):
        part = decoded["preference"][side][0]["content"][1]
        assert part["type"] == "audio" and np.all(decoded["media"][part["codec"]] == cand)
        want, _ = soundfile.read(src / f"c{cand}.wav")
        assert decoded["media"][part["audio"]].shape[0] == len(want)  # 16 kHz in, 16 kHz out
    assert sorted(decoded["media"]) == ["audio0.wav", "audio1.wav", "audio2.wav", "codec0.npy", "codec1.npy",
                                        "spk.npy"]
    assert main(["validate", str(out)]) == 0


def test_dataset_input_names_bad_samples_by_key(src, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_pairs(capsys, src / "thinker", out, "--score", "wer:-1", "--score", "sim:1", "--rule", "all-pairs")
    assert code == 0, err
    assert "missing score: shard-000000.tar: s00000001: candidate 1 has no score 'wer'" in err
    assert "3 prompts read, 3 pairs written from 2 prompts; 1 prompts skipped" in err
    # s0: 0.8 (1) > -0.1 (0) = -0.1 (2): the tie (0, 2) is no pair, (1, 0) and (1, 2) tie at 0.9 and keep
    # the ranking's order; s2: -0.1 (1) > -0.4 (0)
    got = [(w, c, r) for w, c, r, _, _ in read_pairs(out)]
    assert got == [("s00000000", 1, 0), ("s00000000", 1, 2), ("s00000002", 1, 0)]
    assert main(["validate", str(out)]) == 0
    raw = next(_iter_shard(str(out / "shard-000000.tar")))
    decoded = decode_sample(raw)
    assert decoded["messages"] == [_user("Hear this.", "audio0.wav")] and decoded["speaker"]["embedding"] == "spk.npy"
    assert decoded["preference"] == {"chosen": [{"role": "assistant", "content": "cand 1"}],
                                     "rejected": [{"role": "assistant", "content": "cand 0"}]}
    assert decoded["media"]["audio0.wav"].ndim == 1 and decoded["media"]["spk.npy"].tolist() == list(range(8))


def test_deterministic_and_resumable(src, tmp_path, capsys):
    options = ["--score", "wer", "--lower-is-better", "--rule", "all-pairs"]
    run_pairs(capsys, src / "talker.jsonl", tmp_path / "a", *options)
    run_pairs(capsys, src / "talker.jsonl", tmp_path / "b", *options)
    names = [s["name"] for s in shards.read_index(tmp_path / "a")["shards"]]
    assert names and all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    assert shards.read_index(tmp_path / "a") == shards.read_index(tmp_path / "b")
    code, err = run_pairs(capsys, src / "talker.jsonl", tmp_path / "a", *options)
    assert code == 0 and shards.read_index(tmp_path / "a") == shards.read_index(tmp_path / "b")


def test_bad_options_are_refused(src, tmp_path, capsys):
    assert run_pairs(capsys, src / "talker.jsonl", tmp_path / "o", "--score", "wer:x")[0] == 2
    assert run_pairs(capsys, src / "talker.jsonl", tmp_path / "o", "--score", "wer", "--min-margin", "-1")[0] == 2


def test_a_pair_the_build_rejects_is_named(src, tmp_path, capsys):
    (tmp_path / "broken.wav").write_bytes(b"RIFF" + bytes(100))
    for name in ("c0.wav", "c0.npy"):
        (tmp_path / name).write_bytes((src / name).read_bytes())
    broken = {"messages": [{"role": "assistant", "content": [{"type": "audio", "audio": "broken.wav"}]}],
              "scores": {"wer": 0.9}}
    entry = {"messages": [_user("Hi.")], "candidates": [_speech(0), broken]}
    (tmp_path / "m.jsonl").write_text(json.dumps(entry) + "\n")
    code, err = run_pairs(capsys, tmp_path / "m.jsonl", tmp_path / "out", "--score", "wer", "--lower-is-better",
                          "--strict")
    assert code == 1
    assert "bad pair: line 1: preference.rejected[0].content[0]: broken.wav:" in err
    assert "1 prompts read, 0 pairs written from 1 prompts; 0 prompts skipped" in err and "1 pairs failed" in err
    report = [json.loads(l) for l in (tmp_path / "out" / "preference_report.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in report] == [(1, "bad pair")]


def test_built_dataset_without_candidate_media_says_so(src, tmp_path, capsys):
    first = (src / "talker.jsonl").read_text().splitlines()[0]
    (src / "first.jsonl").write_text(first + "\n")
    assert main(["build", str(src / "first.jsonl"), str(tmp_path / "built"), "--no-progress"]) == 0
    code, err = run_pairs(capsys, tmp_path / "built", tmp_path / "out", "--score", "sim")
    assert "bad pair: shard-000000.tar: s00000000: " in err and "does not carry media of `candidates`" in err
    assert code == 0 and shards.read_index(tmp_path / "out")["num_samples"] == 0
