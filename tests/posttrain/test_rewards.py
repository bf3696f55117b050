"""Rewards for GSPO (omni_train/rewards/): the rule functions on hand-made cases, math through math-verify,
a user's function by module path, per-sample specs, config errors, and the model judge through the real
local OpenAI-compatible server (tests/openai_server.py) and a local transformers model.

The judge model is a tiny Qwen3ForCausalLM built as a bigram table: one-hot embeddings, attention and MLP
outputs zeroed, lm_head mapping each token to the next one of "Score: 7" after the generation prompt's last
token, then to <|im_end|>. Whatever the prompt, it answers "Score: 7", greedily, on any batch padding, so
a parsed 0.7 proves the request, the generation and the parsing all went through.
"""

import importlib.util
import math
import os
import time

import numpy as np
import pytest
import torch

from omni_train.config.rewards import JudgeConfig, RewardFunctionConfig, RewardsConfig
from omni_train.data.chat import MediaItem
from omni_train.rewards import RewardRequest, Rewarder, parse_score, resolve
from omni_train.rewards.rules import extract_choice
from openai_server import OpenAIServer

SCORE_REPLY = "Score: 7"
SLOW_S = 1.0


def request(response, reference=None, spec=None, key="s0", question="What is it?", **kw):
    return RewardRequest(key, question, response, reference, spec or {}, **kw)


def score(name, response, reference=None, **kwargs):
    return resolve(name)(request(response, reference, response_tokens=kwargs.pop("tokens", None)), **kwargs)


def rewarder(*functions, judge=None, **kw):
    fns = [RewardFunctionConfig(f) if isinstance(f, str) else f for f in functions]
    return Rewarder(RewardsConfig(functions=fns, judge=judge or JudgeConfig(), **kw))


# ------------------------------------------------------------------------------------------- rule functions
def test_exact_and_normalized_match():
    assert score("exact_match", "Paris", " Paris ") == 1.0
    assert score("exact_match", "paris", "Paris") == 0.0
    assert score("exact_match", "<think>Maybe Lyon</think>\nParis", "Paris") == 1.0  # the reasoning is not the answer
    assert score("normalized_match", "  PARIS!!  ", "paris.") == 1.0
    assert score("normalized_match", "New   York, NY", "new york ny") == 1.0
    assert score("normalized_match", "Paris, France", "Paris") == 0.0
    assert score("normalized_match", "<think>paris</think>Lyon", "Paris") == 0.0


@pytest.mark.parametrize("text,letter", [
    ("The answer is (B).", "B"), ("Answer: C", "C"), ("answer: **D**", "D"), ("The correct option is E", "E"),
    ("\\boxed{A}", "A"), ("B. Paris", "B"), ("(C)", "C"), ("D", "D"),
    ("Option A is wrong, so the answer is C.", "C"), ("I think (B) fits best", "B"),
    ("A cat sat here.", None), ("It is (A) or (B)", None), ("The answer is Because", None)])
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_multiple_choice():
    assert score("multiple_choice", "<think>(A)? no</think>The answer is (B)", "B") == 1.0
    assert score("multiple_choice", "The answer is (B)", "(C) Berlin") == 0.0
    assert score("multiple_choice", "no idea", "C") == 0.0
    assert score("multiple_choice", "Answer: F", "F", letters="ABCDEF") == 1.0


def test_think_format():
    assert score("think_format", "<think>a, then b</think>\nThe answer is 4.") == 1.0
    assert score("think_format", "The answer is 4.") == 0.0
    assert score("think_format", "<think>a</think>") == 0.0  # no answer after the reasoning
    assert score("think_format", "<think>a</think>x<think>b</think>y") == 0.0
    assert score("think_format", "4 <think>a</think> 4") == 0.0  # the reasoning must come first
    assert score("think_format", "a</think>4", prompt_opens_think=True) == 1.0


def test_length_penalty_dapo():
    kw = {"max_length": 100, "cache": 20}
    assert score("length_penalty", "", tokens=80, **kw) == 0.0
    assert score("length_penalty", "", tokens=90, **kw) == pytest.approx(-0.5)
    assert score("length_penalty", "", tokens=100, **kw) == pytest.approx(-1.0)
    assert score("length_penalty", "", tokens=150, **kw) == -1.0


@pytest.mark.parametrize("response,reference,value", [
    ("0.5", "1/2", 1.0), ("The answer is $\\frac{1}{2}$.", "0.5", 1.0), ("\\boxed{\\frac12}", "$\\frac{1}{2}$", 1.0),
    ("$(x+1)^2$", "$x^2+2x+1$", 1.0), ("<think>1/2 is wrong</think>\\boxed{3}", "3", 1.0),
    ("0.6", "1/2", 0.0), ("<think>3</think>\\boxed{4}", "3", 0.0), ("no number here", "1/2", 0.0)])
def test_math_equivalent_forms(response, reference, value):
    assert score("math", response, reference) == value


def test_math_failures_are_not_zero():
    r = rewarder("math")
    batch = r.submit([request("\\boxed{2}", "", key="noref"), request("\\boxed{2}", None, key="none"),
                      request("\\boxed{2}", "2", key="ok")]).result()
    assert batch.failed.tolist() == [True, True, False] and np.isnan(batch.total[:2]).all() and batch.total[2] == 1.0
    assert "no expression in the reference" in batch.errors[0] and "no reference answer" in batch.errors[1]
    # a timer that fires at once: math-verify's work is cut, the sample fails (not 0)
    timed = rewarder(RewardFunctionConfig("math", kwargs={"timeout_s": 1e-6}))
    batch = timed.submit([request("\\boxed{\\frac{1}{2}}", "0.5")]).result()
    assert batch.failed[0] and "ran past timeout_s" in batch.errors[0]


# ------------------------------------------------------------------------------------------- the Rewarder
def test_weighted_total_stats_and_per_sample_spec():
    r = rewarder(RewardFunctionConfig("exact_match", 2.0), RewardFunctionConfig("think_format", 0.5))
    pending = r.submit([
        request("<think>x</think>Paris", "Paris", key="a"),
        request("Lyon", "Paris", key="b"),
        request("Lyon", "Paris", spec={"reference": "Lyon"}, key="c"),  # the spec's reference wins
        request("<think>x</think>Lyon", "Paris", spec={"functions": ["think_format"], "weights": {"think_format": 3}}),
        request("2/4", "Paris", spec={"reference": "0.5", "functions": [{"name": "math", "weight": 4.0}]}),
        request("Lyon", "Paris", spec={"weigths": {"exact_match": 1}}, key="typo"),
    ])
    batch = pending.result()
    assert pending.result() is batch  # asked twice, counted once
    np.testing.assert_allclose(batch.total[:5], [2.5, 0.0, 2.0, 3.0, 4.0])
    assert batch.failed.tolist() == [False] * 5 + [True] and "unknown keys" in batch.errors[5]
    assert batch.applied["exact_match"].tolist() == [True, True, True, False, False, False]
    assert np.isnan(batch.per_function["exact_match"][3]) and batch.per_function["math"][4] == 1.0
    assert batch.stats["reward/exact_match_mean"] == pytest.approx(2 / 3)
    assert batch.stats["reward/total_mean"] == pytest.approx(np.mean([2.5, 0, 2, 3, 4]))
    assert batch.stats["reward/failure_rate"] == pytest.approx(1 / 6) and r.state_dict()["failed_samples"] == 1


def test_user_function_by_module_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_ext.py").write_text(
        "def contains(request, word):\n    return float(word in request.response)\n\n"
        "def broken(request):\n    return 1 / 0\n\ndef none(request):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    r = rewarder(RewardFunctionConfig("my_rewards_ext:contains", 2.0, {"word": "cat"}))
    batch = r.submit([request("a cat"), request("a dog")]).result()
    assert batch.total.tolist() == [2.0, 0.0] and "reward/my_rewards_ext:contains_mean" in batch.stats
    with pytest.raises(RuntimeError, match=r"'my_rewards_ext:broken' raised on sample 'bad7': ZeroDivisionError"):
        rewarder("my_rewards_ext:broken").submit([request("x", key="bad7")])
    with pytest.raises(RuntimeError, match=r"'my_rewards_ext:none' returned None for sample 's0'"):
        rewarder("my_rewards_ext:none").submit([request("x")])
    with pytest.raises(ValueError, match=r"stage.rewards.functions\[0\].kwargs: my_rewards_ext:contains cannot"):
        rewarder(RewardFunctionConfig("my_rewards_ext:contains", kwargs={"wrd": "cat"}))


@pytest.mark.parametrize("change,key", [
    (dict(functions=[RewardFunctionConfig("nope")]), r"stage.rewards.functions\[0\].name: unknown reward function 'nope'"),
    (dict(functions=[RewardFunctionConfig("no.such.module:f")]), r"functions\[0\].name: cannot import"),
    (dict(functions=[RewardFunctionConfig("math", math.nan)]), r"functions\[0\].weight: nan"),
    (dict(functions=[RewardFunctionConfig("math"), RewardFunctionConfig("math")]), r"functions\[1\].name: 'math' appears twice"),
    (dict(functions=[RewardFunctionConfig("length_penalty", kwargs={"max_length": 10})]), r"functions\[0\].kwargs: length_penalty cannot take .*'cache'"),
    (dict(functions=[RewardFunctionConfig("length_penalty", kwargs={"max_length": 10, "cache": 20})]), r"functions\[0\].kwargs.cache: 20"),
    (dict(functions=[RewardFunctionConfig("math", kwargs={"timeout": 3})]), r"functions\[0\].kwargs: math cannot take"),
    (dict(functions=[]), r"stage.rewards.functions: empty and stage.rewards.judge.backend is none"),
    (dict(max_failure_rate=1.5), r"stage.rewards.max_failure_rate: 1.5"),
    (dict(min_samples_for_failure_rate=0), r"stage.rewards.min_samples_for_failure_rate"),
    (dict(judge=JudgeConfig(backend="vllm")), r"stage.rewards.judge.backend: 'vllm'"),
    (dict(judge=JudgeConfig(backend="hf")), r"stage.rewards.judge.path: None"),
    (dict(judge=JudgeConfig(backend="openai")), r"stage.rewards.judge.url: None"),
    (dict(judge=JudgeConfig(backend="openai", url="http://h/v1")), r"stage.rewards.judge.model: empty"),
    (dict(judge=JudgeConfig(backend="openai", url="http://h/v1", model="m", api_key_env="OMNI_TEST_UNSET_KEY")),
     r"judge.api_key_env: the environment variable OMNI_TEST_UNSET_KEY is not set"),
    (dict(judge=JudgeConfig(backend="openai", url="http://h/v1", model="m", template="{question}")), r"judge.template: no \{response\}"),
    (dict(judge=JudgeConfig(backend="openai", url="http://h/v1", model="m", template="{answer} {response}")), r"judge.template: cannot fill"),
    (dict(judge=JudgeConfig(backend="openai", url="http://h/v1", model="m", score_pattern=r"\d+")), r"judge.score_pattern: .* has no group"),
    (dict(judge=JudgeConfig(backend="openai", url="http://h/v1", model="m", concurrency=0)), r"judge.concurrency: 0"),
])
def test_config_errors_name_the_key(change, key):
    cfg = RewardsConfig(**change)
    with pytest.raises(ValueError, match=key):
        Rewarder.check(cfg)
    with pytest.raises(ValueError, match=key):
        Rewarder(cfg)


def test_hydra_structured_config():
    from omegaconf import OmegaConf

    node = OmegaConf.merge(OmegaConf.structured(RewardsConfig), OmegaConf.create(
        {"functions": [{"name": "length_penalty", "weight": 0.5, "kwargs": {"max_length": 8, "cache": 4}}]}))
    r = Rewarder(node)
    assert r.submit([request("x", response_tokens=6)]).result().total.tolist() == [-0.25]
    with pytest.raises(ValueError, match=r"stage.rewards.functions\[0\].kwargs.cache: 9"):
        Rewarder.check(OmegaConf.merge(node, {"functions": [{"name": "length_penalty", "kwargs": {"max_length": 8, "cache": 9}}]}))


# ------------------------------------------------------------------------------------------- the judge
@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """The bigram judge of the module docstring, with a byte-level BPE tokenizer and trl's Qwen3 template."""
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    from omni_train.data.chat import build_test_tokenizer

    out = str(tmp_path_factory.mktemp("judge"))
    tokenizer = build_test_tokenizer(out, extra_texts=[SCORE_REPLY], vocab_size=300)
    trl_dir = importlib.util.find_spec("trl").submodule_search_locations[0]  # the file only: importing trl is slow
    with open(os.path.join(trl_dir, "chat_templates", "qwen3.jinja"), encoding="utf-8") as f:
        tokenizer.chat_template = f.read()
    tokenizer.save_pretrained(out)
    eos, pad = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    chain = [tokenizer(prompt, add_special_tokens=False)["input_ids"][-1], *tokenizer(SCORE_REPLY)["input_ids"], eos]
    assert len(set(chain)) == len(chain), chain
    vocab = len(tokenizer)
    config = Qwen3Config(vocab_size=vocab, hidden_size=vocab, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        following = torch.full((vocab,), eos)
        following[torch.tensor(chain[:-1])] = torch.tensor(chain[1:])
        model.lm_head.weight.zero_()
        model.lm_head.weight[following, torch.arange(vocab)] = 1.0
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out)
    return out


class ScriptedServer(OpenAIServer):
    """The real server; a response holding "SAY<text>END" gets <text> as the judge's reply, any other the
    model's own ("Score: 7"). Fault injection (FAIL500, FAILONCE, SLOW) comes first, as in the base class."""

    def complete(self, body):
        prompt = "\n".join(m["content"] if isinstance(m["content"], str) else
                           "".join(p.get("text", "") for p in m["content"]) for m in body["messages"])
        if "SAY<" not in prompt:
            return super().complete(body)
        self._record_media(body["messages"][-1]["content"])
        text = prompt.split("SAY<", 1)[1].split(">END", 1)[0]
        return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                  "finish_reason": "stop"}]}


@pytest.fixture(scope="module")
def server(judge_dir):
    with ScriptedServer(judge_dir, slow_seconds=SLOW_S, served_model="tiny-judge") as running:
        yield running


def openai_judge(server, **kw):
    defaults = dict(backend="openai", url=server.url, model="tiny-judge", retries=2, backoff_s=0.05, timeout_s=10.0,
                    concurrency=4, max_tokens=8)
    return JudgeConfig(**{**defaults, **kw})


def test_parse_score():
    pattern = JudgeConfig().score_pattern
    assert parse_score("Fine work. Score: 7", pattern, 10) == pytest.approx(0.7)
    assert parse_score("Score: 2 at first... Score = **9.5**", pattern, 10) == pytest.approx(0.95)
    assert parse_score("<think>Score: 1</think>Score: 8/10", pattern, 10) == pytest.approx(0.8)
    assert parse_score("Score: 11", pattern, 10) is None and parse_score("seven", pattern, 10) is None


def test_openai_judge_scores_with_the_model_and_rules(server):
    r = rewarder(RewardFunctionConfig("exact_match", 1.0), judge=openai_judge(server, weight=2.0))
    batch = r.submit([request("Paris", "Paris", key="a"), request("SAY<Score: 3>END", "Paris", key="b"),
                      request("Lyon", "Paris", spec={"functions": ["exact_match"]}, key="c")]).result()
    np.testing.assert_allclose(batch.per_function["judge"][:2], [0.7, 0.3])  # the tiny model's real reply, a scripted one
    np.testing.assert_allclose(batch.total, [1 + 2 * 0.7, 2 * 0.3, 0.0])
    assert batch.applied["judge"].tolist() == [True, True, False] and batch.judge_replies[0] == SCORE_REPLY
    assert not batch.failed.any() and batch.stats["reward/judge_mean"] == pytest.approx(0.5)
    asked = [q for q in server.requests if "Paris" in q.prompt and "Reference answer" in q.prompt]
    assert asked and asked[0].body["model"] == "tiny-judge" and asked[0].body["temperature"] == 0.0


def test_openai_judge_failures_are_counted_not_zero(server):
    r = rewarder(judge=openai_judge(server, timeout_s=0.3))
    start = time.perf_counter()
    pending = r.submit([request("FAILONCE lemon", key="once"), request("SLOW lime", key="slow"),
                        request("SAY<I cannot grade this.>END", key="garbage"), request("FAIL500 kiwi", key="500"),
                        request("SAY<Score: 10>END", key="ok")])
    assert time.perf_counter() - start < 0.2  # submit returns at once
    batch = pending.result()
    assert batch.failed.tolist() == [False, True, True, True, False]
    np.testing.assert_allclose(batch.total[[0, 4]], [0.7, 1.0])
    assert np.isnan(batch.total[1:4]).all() and np.isnan(batch.per_function["judge"][1:4]).all()
    assert "timed out (after 3 attempts)" in batch.errors[1]
    assert "no score in the reply 'I cannot grade this.' (after 1 attempts)" in batch.errors[2]  # greedy: asked once
    assert "HTTP 500" in batch.errors[3] and server.count("FAIL500 kiwi") == 3
    assert server.count("FAILONCE lemon") == 2
    # retries: once (1) + slow (2) + 500 (2); failures: slow, garbage, 500
    assert batch.stats["reward/judge_retries"] == 5 and batch.stats["reward/judge_failures"] == 3
    state = r.state_dict()
    assert (state["samples"], state["failed_samples"], state["judge_retries"]) == (5, 3, 5)
    assert state["reasons"] == {"judge: timed out": 1, "judge: no score in the reply": 1, "judge: HTTP 500": 1}


def test_failure_rate_stops_the_run_and_resumes_exactly(server):
    cfg = dict(judge=openai_judge(server), max_failure_rate=0.4, min_samples_for_failure_rate=4)
    garbage, good = request("SAY<nothing>END"), request("SAY<Score: 5>END")
    r = rewarder(**cfg)
    assert r.submit([garbage, garbage]).result().stats["reward/failure_rate"] == 1.0  # under min samples: no stop
    assert r.submit([good] * 4).result().stats["reward/failure_rate"] == pytest.approx(2 / 6)
    state = r.state_dict()
    for run in (r, rewarder(**cfg)):  # the same stop after a resume from the state after the second batch
        run.load_state_dict(state)
        with pytest.raises(RuntimeError, match=r"rewards: 4 of 8 samples failed \(50.0%\), more than "
                                               r"stage.rewards.max_failure_rate=0.4 .*judge: no score in the reply x4"):
            run.submit([garbage, garbage]).result()


def test_openai_judge_calls_run_concurrently_and_get_media(server):
    from PIL import Image

    r = rewarder(judge=openai_judge(server, concurrency=4))
    start = time.perf_counter()
    batch = r.submit([request(f"SLOW SAY<Score: {i}>END", key=str(i)) for i in range(4)]).result()
    elapsed = time.perf_counter() - start
    np.testing.assert_allclose(batch.total, [0.0, 0.1, 0.2, 0.3])
    assert SLOW_S <= elapsed < 2 * SLOW_S, elapsed  # 4 x SLOW_S one at a time
    image = Image.new("RGB", (8, 8), (255, 0, 0))
    seen = len(server.media)
    r.submit([request("SAY<Score: 4>END text only", media=[image])]).result()  # send_media is off by default
    assert len(server.media) == seen
    r = rewarder(judge=openai_judge(server, send_media=True))
    batch = r.submit([request("SAY<Score: 4>END pic", media=[image]), request("SAY<Score: 4>END item",
                      media=[MediaItem("image", "image0.jpg", (0, 4), 2, {})])]).result()
    kind, url = server.media[-1]
    assert kind == "image_url" and url.startswith("data:image/png;base64,") and batch.total[0] == 0.4
    assert batch.failed[1] and "is a MediaItem" in batch.errors[1]  # model inputs, not a file: failed, not 0


def test_openai_judge_refused_stops_the_run(server):
    r = rewarder(judge=openai_judge(server, url=server.url.replace("/v1", "/v2")))
    with pytest.raises(RuntimeError, match="HTTP 404"):
        r.submit([request("x")]).result()


def test_hf_judge_generates_in_left_padded_batches(judge_dir):
    judge = JudgeConfig(backend="hf", path=judge_dir, device="cpu", batch_size=2, max_tokens=8)
    r = rewarder("exact_match", judge=judge)
    assert r._judge.model is None  # loaded on the first submit
    questions = ["Hi?", "What is the capital city of France, the country in Europe?", "Why?"]
    batch = r.submit([request("Paris", "Paris", key=str(i), question=q) for i, q in enumerate(questions)]
                     + [request("Paris", "Paris", spec={"functions": ["exact_match"]})]).result()
    np.testing.assert_allclose(batch.per_function["judge"][:3], 0.7)
    np.testing.assert_allclose(batch.total, [1.7, 1.7, 1.7, 1.0])
    assert batch.judge_replies[:3] == [SCORE_REPLY] * 3 and batch.judge_replies[3] is None
