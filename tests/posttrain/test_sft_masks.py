"""SFT's tokens and loss mask: equal to trl's `assistant_only_loss` mask on text conversations (trl's
Qwen3 training template, applied by trl's own SFTTrainer), placeholders and system/user turns never
targets on multimodal ones, and reasoning rendered as Qwen3's own template renders it."""

import numpy as np
import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM
from trl import SFTConfig, SFTTrainer
from trl.chat_template_utils import qwen3_chat_template

from omni_train.data.chat import ChatEncoder, apply_think_mode, build_test_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "What is 2 plus 3?"},
     {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n5."},
     {"role": "user", "content": "And times 2?"},
     {"role": "assistant", "content": "10, since 5 times 2 is 10."}],
    [{"role": "user", "content": "Think first: is 7 prime?"},
     {"role": "assistant", "content": "Yes.", "reasoning_content": "Only 1 and 7 divide it."}],
    [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "\n1 2 3"},
     {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "<think>\n\n</think>\n\n1 2 3"}],
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_tok")
    texts = [m["content"] for c in CONVERSATIONS for m in c] + [m.get("reasoning_content", "") for c in CONVERSATIONS
                                                               for m in c]
    tok = build_test_tokenizer(str(path), extra_texts=texts)
    tok.chat_template = qwen3_chat_template  # trl swaps in its training variant for assistant_only_loss
    tok.save_pretrained(str(path))
    return path


def trl_masks(tokenizer_dir, tmp_path):
    """(input_ids, mask) as trl's SFTTrainer prepares them with assistant_only_loss=True (it folds the
    template's assistant mask into the labels: -100 where a token is not a target)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         head_dim=8))
    args = SFTConfig(output_dir=str(tmp_path), assistant_only_loss=True, report_to=[], max_length=None,
                     dataset_num_proc=None, use_cpu=True)
    trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"messages": c} for c in CONVERSATIONS]))
    return [(row["input_ids"], [int(label != -100) for label in row["labels"]]) for row in trainer.train_dataset]


def test_text_mask_equals_trl_assistant_only_loss(tokenizer_dir, tmp_path):
    encoder = ChatEncoder.from_pretrained(str(tokenizer_dir), think="keep", target_newline_after_end=True)
    expected = trl_masks(tokenizer_dir, tmp_path)
    assert len(expected) == len(CONVERSATIONS)
    for conversation, (ids, mask) in zip(CONVERSATIONS, expected):
        ours = encoder.encode_messages(conversation, {})
        assert ours.input_ids.tolist() == list(ids)
        assert ours.loss_mask.int().tolist() == list(mask), encoder.tokenizer.decode(ids)
        assert 0 < sum(mask) < len(mask)


def test_think_modes_render_as_qwen3s_template(tokenizer_dir):
    """keep = trl's training template (above); last = Qwen3's own template (reasoning only after the last
    user turn); empty = enable_thinking=False's empty block; strip = no block."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for conversation in CONVERSATIONS:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=qwen3_chat_template)
        ours = ChatEncoder(tokenizer, think="last").encode_messages(conversation, {})
        assert tokenizer.decode(ours.input_ids) == rendered
    last = apply_think_mode(CONVERSATIONS[1], "last")
    assert last[2]["content"] == "5." and last[4]["content"] == "<think>\n\n</think>\n\n10, since 5 times 2 is 10."
    assert [m["content"] for m in apply_think_mode(CONVERSATIONS[2], "empty")][1] == "<think>\n\n</think>\n\nYes."
    assert [m["content"] for m in apply_think_mode(CONVERSATIONS[1], "strip")][2::2] == ["5.",
                                                                                     "10, since 5 times 2 is 10."]


def test_system_prompt_added_only_where_missing(tokenizer_dir):
    encoder = ChatEncoder.from_pretrained(str(tokenizer_dir), system_prompt="Answer briefly.")
    text = lambda c: encoder.tokenizer.decode(encoder.encode_messages(c, {}).input_ids)  # noqa: E731
    assert text(CONVERSATIONS[0]).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user")
    assert text(CONVERSATIONS[1]).count("<|im_start|>system") == 1


def test_multimodal_placeholders_and_prompt_turns_never_carry_loss(tokenizer_dir):
    encoder = ChatEncoder.from_pretrained(str(tokenizer_dir), think="keep", target_newline_after_end=True)
    rng = np.random.default_rng(0)
    media = {"a0.flac": (0.1 * rng.standard_normal(16000 * 2)).astype(np.float32),
             "i0.png": rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)}
    conversation = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [{"type": "audio", "audio": "a0.flac"}, {"type": "image", "image": "i0.png"},
                                     {"type": "text", "text": "What do you hear and see?"}]},
        {"role": "assistant", "content": "A tone and a picture."},
        {"role": "user", "content": [{"type": "image", "image": "i0.png"}, {"type": "text", "text": "Again?"}]},
        {"role": "assistant", "content": "<think>\nSame picture.\n</think>\n\nThe same picture."}]
    sample = encoder.encode_messages(conversation, media)
    ids, mask = sample.input_ids, sample.loss_mask
    placeholders = [encoder.ids[k] for k in ("audio_start", "audio_end", "audio_pad", "vision_start",
                                             "vision_end", "image_pad", "video_pad")]
    assert torch.isin(ids, torch.tensor(placeholders)).sum() > 30
    assert not mask[torch.isin(ids, torch.tensor(placeholders))].any()
    # targets: exactly the two assistant turns (think block, answer, <|im_end|>, newline), nothing else
    targets = encoder.tokenizer.decode(ids[mask])
    assert targets == ("<think>\n\n</think>\n\nA tone and a picture.<|im_end|>\n"
                       "<think>\nSame picture.\n</think>\n\nThe same picture.<|im_end|>\n")
    header = encoder.tokenizer("assistant\n", add_special_tokens=False)["input_ids"]
    for start, end in sample.assistant_spans:
        assert mask[start:end].all() and not mask[start - len(header) - 1:start].any()
    assert len(sample.media) == 3 and all(not mask[s:e].any() for s, e in sample.media_spans)
