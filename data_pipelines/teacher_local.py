"""A local teacher: any `AutoModelForCausalLM` directory whose tokenizer has a chat template.

Prompts are rendered by the tokenizer's chat template (`enable_thinking` from the mode) and generated
in batches with left padding: greedy at temperature 0, else sampled (temperature, top-p, no top-k) from
a seed fixed per batch. Text only: a prompt with media is reported per sample. A response ends at the
first eos id of the model's generation config (the tokenizer's eos without one); the stored tokens
include it. Top-k log-probabilities are log_softmax of the raw logits (`output_logits`), the teacher's
distribution at temperature 1, whatever the sampling options.
"""

import os
import zlib

import numpy as np

from data_pipelines.teacher_prompts import Answer, TeacherError, text_messages


class LocalTeacher:
    def __init__(self, model_dir, options, batch_size=8):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.options, self.batch_size = options, max(1, batch_size)
        self.identity = f"local {os.path.abspath(model_dir)}"  # what the resume fingerprint knows it by
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if not self.tokenizer.chat_template:
            raise TeacherError(f"the tokenizer in {model_dir} has no chat template")
        self.tokenizer.padding_side = "left"
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).to(self.device).eval()
        self.eos_ids = self._eos_ids()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    def _eos_ids(self):
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = self.tokenizer.eos_token_id if eos is None else eos
        if eos is None:
            raise TeacherError("the teacher has no eos token (generation_config.eos_token_id or tokenizer.eos_token)")
        return [eos] if isinstance(eos, int) else list(eos)

    def prepare(self, messages, members):
        """The chat-template text of a sample's prompt (SampleFailed for a media prompt)."""
        return self.tokenizer.apply_chat_template(text_messages(messages), tokenize=False, add_generation_prompt=True,
                                                  enable_thinking=self.options.mode == "think")

    def answer(self, prompts, on_done=lambda n: None):
        """[(key, prompt text)] -> {key: Answer}, in batches of batch_size (of similar lengths: less padding)."""
        answers, prompts = {}, sorted(prompts, key=lambda p: (len(p[1]), p[0]))
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start:start + self.batch_size]
            answers.update(zip([k for k, _ in batch], self._generate([k for k, _ in batch], [t for _, t in batch])))
            on_done(len(batch))
        return answers

    def _generate(self, keys, texts):
        import torch
        from transformers import GenerationConfig

        opts = self.options
        sampled = opts.temperature > 0
        config = GenerationConfig(max_new_tokens=opts.max_new_tokens, do_sample=sampled,
                                  temperature=opts.temperature if sampled else None,
                                  top_p=opts.top_p if sampled else None, top_k=0 if sampled else None,
                                  eos_token_id=self.eos_ids, pad_token_id=self.pad_id,
                                  output_logits=bool(opts.top_logprobs), return_dict_in_generate=True)
        inputs = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt").to(self.device)
        if sampled:
            torch.manual_seed(opts.seed + zlib.crc32(keys[0].encode()))
        with torch.no_grad():
            out = self.model.generate(**inputs, generation_config=config)
        generated = out.sequences[:, inputs["input_ids"].shape[1]:].cpu()
        top = None
        if opts.top_logprobs:  # step by step: never the [batch, steps, vocab] log-probabilities at once
            steps = [logits.float().log_softmax(-1).topk(opts.top_logprobs, dim=-1) for logits in out.logits]
            top = (torch.stack([s.indices for s in steps], 1).cpu(), torch.stack([s.values for s in steps], 1).cpu())
        return [self._answer(generated[i], top and (top[0][i], top[1][i])) for i in range(len(texts))]

    def _answer(self, ids, top):
        ids = ids.tolist()
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), None)
        stopped = end is not None
        ids = ids[:end + 1] if stopped else ids
        text = self.tokenizer.decode(ids[:-1] if stopped else ids, skip_special_tokens=True)
        answer = Answer(text, "stop" if stopped else "length", np.asarray(ids, np.int32))
        if top is not None:  # topk sorts descending
            answer.top_ids = top[0][:len(ids)].numpy().astype(np.int32)
            answer.top_logprobs = top[1][:len(ids)].numpy()
        return answer
