"""omni-data teacher-responses: a tiny Qwen3 teacher answers a built dataset, locally and through a real
OpenAI-compatible server (tests/openai_server.py) backed by the same model.

The references are transformers' own: `generate` on each chat-template prompt alone (the tool generates
in left-padded batches) and a plain forward over prompt + response for the top-k log-probabilities.
"""

import base64
import contextlib
import importlib.util
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

from data_pipelines import shards
from data_pipelines.cli import main
from data_pipelines.validate import check_sample_members
from openai_server import OpenAIServer

TOP_K = 4
MAX_NEW = 12
API_KEY = "sk-test-5f0e1d2c3b4a"
KEY_ENV = "OMNI_TEST_TEACHER_KEY"


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


# manifest line i -> sample s0000000i; 3 samples per shard
ENTRIES = [
    {"messages": [_user("What is two plus three?")],
     "teacher": [{"model": "earlier", "messages": [_assistant("Five.")]}]},
    {"messages": [_user("Tell me a story about a small cat."), _assistant("Once upon a time.")]},
    {"messages": [{"role": "system", "content": "You are a helpful assistant."}, _user("Name a green thing.")]},
    {"messages": [_user("What is four plus five?"), _assistant("Nine."),
                  {"role": "user", "content": [{"type": "text", "text": "And seven "},
                                               {"type": "text", "text": "more?"}]},
                  _assistant("Sixteen.")]},
    {"messages": [_user("Do you hear the dog barking?")]},
    {"messages": [{"role": "user", "content": [{"type": "image", "image": "picture.png"},
                                               {"type": "text", "text": "What do you see?"}]}]},
    {"messages": [_user("The quick brown fox.")]},
    {"messages": [_user("FAIL500 maybe apples.")]},
    {"messages": [_user("FAILONCE three trees.")]},
    {"messages": [_user("SLOW answer about the park.")]},
]
TEXTS = ["What is two plus three? The answer is four and five, maybe seven apples or green trees.",
         "Tell me a story about a small cat. The quick brown fox and the dog barking in a park."]
MEDIA_KEY, FAIL_KEY, ONCE_KEY, SLOW_KEY = "s00000005", "s00000007", "s00000008", "s00000009"


def run_cli(*args):
    """omni-data in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def read_dataset(directory):
    """{key: (sample JSON, {suffix: bytes})} of every shard listed in the index, in order."""
    samples = {}
    for entry in shards.read_index(directory)["shards"]:
        for key, members in shards.iter_tar_samples(os.path.join(directory, entry["name"])):
            samples[key] = (json.loads(members["json"]), members)
    return samples


def report(directory):
    with open(os.path.join(directory, "teacher_report.jsonl"), encoding="utf-8") as f:
        return {line["key"]: line for line in map(json.loads, f)}


def arrays(sample, members, entry):
    return [np.load(io.BytesIO(members[entry["logprobs"][f]])) for f in ("tokens", "top_ids", "top_logprobs")]


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
    """A tiny random Qwen3ForCausalLM with a byte-level BPE tokenizer, Qwen's special tokens and trl's Qwen3
    chat template. Its lm_head favours whole-word tokens and <|im_end|>, so that answers are readable,
    re-tokenize to the ids generated, and some stop while others run to the length limit."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from omni_train.data.chat import build_test_tokenizer

    out = str(tmp_path_factory.mktemp("teacher"))
    tokenizer = build_test_tokenizer(out, extra_texts=TEXTS, vocab_size=400)
    trl_dir = importlib.util.find_spec("trl").submodule_search_locations[0]  # the file only: importing trl is slow
    with open(os.path.join(trl_dir, "chat_templates", "qwen3.jinja"), encoding="utf-8") as f:
        tokenizer.chat_template = f.read()
    tokenizer.save_pretrained(out)
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.1, eos_token_id=eos, pad_token_id=pad,
                         bos_token_id=None)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    words = [i for t, i in tokenizer.get_vocab().items() if t.startswith("\u0120") and t[1:].isalpha() and len(t) > 3]
    with torch.no_grad():
        favoured = torch.zeros(len(tokenizer), dtype=torch.bool)
        favoured[words + [eos]] = True
        model.lm_head.weight[~favoured] *= 0.05
        model.lm_head.weight[favoured] *= 3.0
        model.lm_head.weight[eos] *= 2.0
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """ENTRIES built by `omni-data build` into 4 shards."""
    from PIL import Image

    src = tmp_path_factory.mktemp("teacher_src")
    Image.new("RGB", (64, 48), (200, 30, 30)).save(src / "picture.png")
    (src / "manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ENTRIES))
    out = src / "dataset"
    assert run_cli("build", src / "manifest.jsonl", out, "--samples-per-shard", 3, "--no-progress")[0] == 0
    return out


@pytest.fixture(scope="session")
def server(teacher_dir):
    with OpenAIServer(teacher_dir, api_key=API_KEY, slow_seconds=2.5) as running:
        yield running


@pytest.fixture(scope="session")
def local_run(teacher_dir, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    result = run_cli("teacher-responses", dataset, out, "--model", teacher_dir, "--name", "tiny", "--mode", "no_think",
                     "--max-new-tokens", MAX_NEW, "--top-logprobs", TOP_K, "--batch-size", 4, "--no-progress")
    return out, result


def endpoint_args(dataset, out, server, *extra):
    return ["teacher-responses", dataset, out, "--url", server.url, "--api-key-env", KEY_ENV, "--name", "tiny",
            "--mode", "no_think", "--max-new-tokens", MAX_NEW, "--top-logprobs", TOP_K, "--workers", 3,
            "--timeout", 1, "--retries", 1, "--backoff", 0.05, *extra]


@pytest.fixture(scope="session")
def endpoint_run(dataset, server, tmp_path_factory):
    """The endpoint run with faults on, --strict, and the progress bar (to look for the key in it)."""
    out = tmp_path_factory.mktemp("endpoint") / "out"
    os.environ[KEY_ENV] = API_KEY
    try:
        result = run_cli(*endpoint_args(dataset, out, server, "--strict"))
    finally:
        del os.environ[KEY_ENV]
    return out, result, {"FAILONCE": server.count("FAILONCE"), "FAIL500": server.count("FAIL500")}


def reference_prompt_ids(tokenizer, entry, mode="no_think"):
    messages = entry["messages"]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    prompt = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
               else "".join(p["text"] for p in m["content"])} for m in messages[:last_user + 1]]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=mode == "think")
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def test_local_teacher_equals_transformers_generate(teacher_dir, dataset, local_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, (rc, stdout, stderr) = local_run
    assert rc == 0, stderr
    assert "teacher-responses: 10 samples, 9 answered, 1 failed" in stderr
    assert report(out) == {MEDIA_KEY: {"key": MEDIA_KEY, "shard": "shard-000001.tar",
                                       "reason": "media prompt: teacher takes text only"}}
    assert run_cli("validate", out)[0] == 0
    tokenizer, model = AutoTokenizer.from_pretrained(teacher_dir), AutoModelForCausalLM.from_pretrained(teacher_dir)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    before, after = read_dataset(dataset), read_dataset(out)
    assert list(after) == list(before)
    finishes = set()
    for i, entry in enumerate(ENTRIES):
        key = f"s{i:08d}"
        old, (sample, members) = before[key][0], after[key]
        assert {**sample, "teacher": None} == {**old, "teacher": None}  # messages, meta unchanged
        assert all(members[s] == d for s, d in before[key][1].items() if s != "json")  # media bytes unchanged
        if key == MEDIA_KEY:
            assert sample == old and members == before[key][1]
            continue
        assert sample["teacher"][:-1] == old.get("teacher", [])  # earlier entries kept
        new = sample["teacher"][-1]
        j = len(sample["teacher"]) - 1
        assert new["model"] == "tiny" and new["mode"] == "no_think"
        assert new["logprobs"] == {f: f"teacher{j}_{f}.npy" for f in ("tokens", "top_ids", "top_logprobs")}
        tokens, top_ids, top_logprobs = arrays(sample, members, new)
        assert tokens.dtype == top_ids.dtype == np.int32 and top_logprobs.dtype == np.float32
        assert top_ids.shape == top_logprobs.shape == (len(tokens), TOP_K)

        prompt = reference_prompt_ids(tokenizer, entry)
        with torch.no_grad():
            expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_NEW,
                                      do_sample=False)[0, prompt.shape[1]:].tolist()
            logits = model(torch.cat([prompt, torch.from_numpy(tokens).long()[None]], 1)).logits[0]
        assert tokens.tolist() == expected
        stopped = expected[-1] == eos
        assert new["finish_reason"] == ("stop" if stopped else "length")
        assert [m["role"] for m in new["messages"]] == ["assistant"]
        content = new["messages"][0]["content"]
        assert content == tokenizer.decode(expected[:-1] if stopped else expected)
        if stopped:  # the answer re-tokenizes to the generated ids, then <|im_end|>
            assert tokens.tolist() == tokenizer(content, add_special_tokens=False)["input_ids"] + [eos]
        finishes.add(new["finish_reason"])

        # top-k of the teacher's distribution (temperature 1) at each generated position
        log_probs = logits[prompt.shape[1] - 1:-1].log_softmax(-1)
        reference = log_probs.topk(TOP_K, dim=-1).values.numpy()
        np.testing.assert_allclose(top_logprobs, reference, atol=1e-5)
        np.testing.assert_allclose(log_probs.gather(1, torch.from_numpy(top_ids).long()).numpy(), top_logprobs,
                                   atol=1e-5)
    assert finishes == {"stop", "length"}


def test_endpoint_answers_like_the_local_teacher(dataset, server, local_run, endpoint_run):
    out, (rc, stdout, stderr), counts = endpoint_run
    assert rc == 1  # --strict, and two samples failed
    assert "teacher-responses: 10 samples, 8 answered, 2 failed" in stderr
    failed = report(out)
    assert sorted(failed) == [FAIL_KEY, SLOW_KEY]
    assert failed[FAIL_KEY]["shard"] == "shard-000002.tar"
    assert "HTTP 500" in failed[FAIL_KEY]["reason"] and "after 2 attempts" in failed[FAIL_KEY]["reason"]
    assert "timed out" in failed[SLOW_KEY]["reason"] and failed[SLOW_KEY]["shard"] == "shard-000003.tar"
    assert counts == {"FAILONCE": 2, "FAIL500": 2}  # FAILONCE went through on its retry
    assert run_cli("validate", out)[0] == 0

    inputs, local, remote = read_dataset(dataset), read_dataset(local_run[0]), read_dataset(out)
    for key, (sample, members) in remote.items():
        if key in (FAIL_KEY, SLOW_KEY):  # written unchanged
            assert members == inputs[key][1]
            continue
        new = sample["teacher"][-1]
        if key == MEDIA_KEY:  # the endpoint takes media: the image went as a data: URL of the member bytes
            image = members[sample["messages"][0]["content"][0]["image"]]
            assert ("image_url", "data:image/png;base64," + base64.b64encode(image).decode()) in server.media
            continue
        expected = local[key][0]["teacher"][-1]
        assert new == expected
        for ours, theirs in zip(arrays(sample, members, new), arrays(*local[key], expected)):
            np.testing.assert_allclose(ours, theirs, atol=1e-5)

    # the API key is never written or printed
    assert API_KEY not in stdout + stderr
    for root, _, files in os.walk(out):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                assert API_KEY.encode() not in f.read(), name


def test_rerun_redoes_only_missing_and_failed_samples(dataset, server, endpoint_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(endpoint_run[0], out)
    first = read_dataset(out)
    os.remove(out / "shard-000001.tar")  # as if the run had died while writing it
    (out / "shard-000001.tar.tmp-12345").write_bytes(b"half a tar")
    asked = server.count()
    server.faults = False
    os.environ[KEY_ENV] = API_KEY
    try:
        rc, _, stderr = run_cli(*endpoint_args(dataset, out, server, "--no-progress", "--strict"))
        assert rc == 0, stderr
        # shard 1's three samples, the two failures, and one probe of the log-probability format
        assert server.count() - asked == 3 + 2 + 1
        assert server.count("FAILONCE") == 2  # answered before: not asked again
        assert "teacher-responses: 10 samples, 10 answered, 0 failed" in stderr and report(out) == {}
        again = read_dataset(out)
        for key in ("s00000006", ONCE_KEY, "s00000000"):  # kept as written, no second entry
            assert again[key] == first[key]
        assert len(again[FAIL_KEY][0]["teacher"]) == 1
        assert not list(out.glob("*.tmp-*"))
        asked = server.count()
        assert run_cli(*endpoint_args(dataset, out, server, "--no-progress"))[0] == 0
        assert server.count() == asked  # all done: no request at all
        assert run_cli(*endpoint_args(dataset, out, server, "--no-progress", "--seed", 1))[0] == 0
        assert server.count() - asked == 10 + 1  # other options: every shard is redone
    finally:
        server.faults = True
        del os.environ[KEY_ENV]
    assert run_cli("validate", out)[0] == 0


def test_two_runs_add_two_entries_the_loader_checks(teacher_dir, local_run, tmp_path):
    from omni_train.data.decode import decode_sample
    from omni_train.data.errors import SampleError

    from transformers import AutoModelForCausalLM, AutoTokenizer

    second = tmp_path / "second"
    rc, _, stderr = run_cli("teacher-responses", local_run[0], second, "--model", teacher_dir, "--name", "other",
                            "--mode", "think", "--max-new-tokens", 6, "--top-logprobs", 2, "--temperature", 0.5,
                            "--top-p", 0.8, "--seed", 3, "--no-progress")
    assert rc == 0, stderr
    assert run_cli("validate", second)[0] == 0
    sample, members = read_dataset(second)["s00000000"]
    assert [(t["model"], t.get("mode")) for t in sample["teacher"]] == \
        [("earlier", None), ("tiny", "no_think"), ("other", "think")]
    assert sample["teacher"][2]["logprobs"]["top_ids"] == "teacher2_top_ids.npy"
    tokens, top_ids, top_logprobs = arrays(sample, members, sample["teacher"][2])
    # sampled at temperature 0.5, top-p 0.8: the stored distribution is still the raw one (temperature 1)
    tokenizer, model = AutoTokenizer.from_pretrained(teacher_dir), AutoModelForCausalLM.from_pretrained(teacher_dir)
    prompt = reference_prompt_ids(tokenizer, ENTRIES[0], mode="think")
    with torch.no_grad():
        logits = model(torch.cat([prompt, torch.from_numpy(tokens).long()[None]], 1)).logits[0]
    log_probs = logits[prompt.shape[1] - 1:-1].log_softmax(-1)
    np.testing.assert_allclose(log_probs.topk(2, dim=-1).values.numpy(), top_logprobs, atol=1e-5)

    raw = {"__key__": "s00000000", **members}
    decoded = decode_sample(raw)
    assert decoded["media"]["teacher2_tokens.npy"].dtype == np.int32
    del raw["teacher1_top_logprobs.npy"]
    with pytest.raises(SampleError, match="teacher1_top_logprobs.npy"):
        decode_sample(raw)

    sample["teacher"][2]["logprobs"]["tokens"] = "teacher1_tokens.npy"  # another entry's member
    bad = {**members, "json": json.dumps(sample).encode()}
    assert any("must be 'teacher2_tokens.npy'" in r for r in check_sample_members("s00000000", bad)[2])
    short = {**members, "teacher1_top_ids.npy": members["teacher2_top_ids.npy"]}  # [n, 2], tokens are [m]
    reasons = check_sample_members("s00000000", short)[2]
    assert any("teacher[1].logprobs" in r and "top_ids" in r for r in reasons), reasons


def test_token_strings_map_to_ids_through_a_tokenizer(teacher_dir, dataset, server, local_run, tmp_path):
    """A server without vLLM's return_tokens_as_token_ids: --tokenizer maps token bytes to ids; without it the
    run stops with a clear error after one probe request, before any sample is generated."""
    os.environ[KEY_ENV] = API_KEY
    server.token_ids, server.faults = False, False
    try:
        asked = server.count()
        rc, _, stderr = run_cli(*endpoint_args(dataset, tmp_path / "none", server, "--no-progress"))
        assert rc == 2 and "give --tokenizer DIR" in stderr and server.count() == asked + 1
        assert not list((tmp_path / "none").glob("shard-*"))
        rc, _, stderr = run_cli(*endpoint_args(dataset, tmp_path / "mapped", server, "--no-progress",
                                               "--tokenizer", teacher_dir))
    finally:
        server.token_ids, server.faults = True, True
        del os.environ[KEY_ENV]
    assert rc == 0, stderr
    local, mapped = read_dataset(local_run[0]), read_dataset(tmp_path / "mapped")
    for key in ("s00000000", "s00000003", "s00000006"):
        ours, theirs = mapped[key][0]["teacher"][-1], local[key][0]["teacher"][-1]
        for a, b in zip(arrays(*mapped[key], ours), arrays(*local[key], theirs)):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_distill_offpolicy_trains_on_the_stored_top_k(teacher_dir, local_run, tmp_path):
    """The tool's output feeds the distill_offpolicy stage: the student trains on the teacher's answers and
    its stored top-4 distributions (data.responses.top_logprobs=4); KL and NLL fall; samples without a
    usable answer (the image prompt, answers cut at the length limit) are skipped and counted."""
    from cli import metrics, omni_train

    out, _ = local_run
    run_dir = tmp_path / "distill"
    omni_train(["recipe=tiny/distill_offpolicy", "init_from=null", f"run_dir={run_dir}",
                f"data.datasets=[{{path: {out}, weight: 1.0}}]", f"data.tokenizer={teacher_dir}",
                "data.responses.teachers=[tiny]", f"data.responses.top_logprobs={TOP_K}", "trainer.max_steps=8",
                "trainer.seq_length=128", "checkpoint.save_every=100", "checkpoint.save_at_end=false"])
    records = metrics(run_dir)
    first, last = records[1], records[8]
    assert last["kl_top_k"] < 0.7 * first["kl_top_k"] and last["loss_nll"] < first["loss_nll"]
    assert first["kl_top_k_count"] > 0 and first["loss"] > first["loss_nll"]  # both terms in the loss
    assert last["data_skipped"] > 0
