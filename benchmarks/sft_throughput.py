"""SFT training throughput on packed multimodal conversations, on one GPU: omni-train's trainer against
transformers' Qwen3-Omni Thinker, both fed the same conversations.

On the lent H200, from the repository root with .whl/ carried (arch_check.sh installs the wheels, then runs
``python3 benchmarks/sft_throughput.py --json $OUT/sft_throughput.json``; about 5-8 minutes):
    bash benchmarks/arch_check.sh sft
On a CPU, to check the logic end to end (tiny_omni, 3 steps of 2 x 512 tokens, 24 conversations; 2-4 minutes):
    python benchmarks/sft_throughput.py --smoke --json /tmp/sft_smoke.json

Parts, each a subprocess with its own timeout and all within ``--deadline`` (a part that fails or runs out of
time is reported; the steps it finished still count, the others still run):

1. data: ``python -m data_pipelines.cli synth-suite DIR sft=N --workers 8`` (system prompts, multi-turn text,
   <think> responses, audio, image, video with its audio, audio + image; ~115 tokens each).
2. ours: ``python -m omni_train.train recipe=tiny/sft`` with overrides (``ours_overrides``): the omni proxy of
   RESULTS.md (the 30B-A3B widths and towers, 4 LM layers, 128 experts top-8, dropless, no load-balancing
   loss), bf16 parameters, gradients and AdamW moments (``optim.master_weights=false``, as the omni rows of
   RESULTS steps 4-5 and as transformers + torch AdamW), ``--seq-length`` 8192, ``--global-batch`` packed
   sequences per optimizer step, constant LR; per-step figures from its metrics.jsonl.
3. transformers: ``Qwen3OmniMoeThinkerForConditionalGeneration`` of the same sizes (our LM's text config, our
   towers, the tokenizer's placeholder ids: ``throughput_variants.hf_thinker_config``), bf16, experts
   ``--hf-experts`` (grouped_mm), SDPA attention, ``torch.optim.AdamW(fused=True)``, clipping as ours. Its
   data are ours: the stage's own source (ShardSource: same config, seed and loader workers, so the same
   stream) replayed for the same steps; each packed sequence is cut back into its conversations (chat-encoded
   by ``chat_encoder``, media collated by ``collate_media``), one conversation per forward with its own TM-RoPE
   position ids, labels = our loss mask's targets (-100 elsewhere), gradients accumulated over all of a
   step's conversations and normalised by the step's target count, as ours is.

Figures, per step, then the median over the steps after ``--warmup``: real tokens/s (the step's non-padding
tokens, the same for both sides), TFLOP/s = tokens/s x ``omni_train.metrics.flops_per_token`` (the LM,
Megatron's formula at seq_length, as the trainer counts), MFU = TFLOP/s / ``device_peak_flops`` (989 TFLOP/s
on H100/H200), total MFU adding the towers' FLOPs (``audio_tower_flops`` / ``vision_tower_flops`` of each
item). Step times: ours from its logged tokens/s (global batch x seq_length / step); transformers' host time
of a step ending in a device sync. Peak memory: ``max_memory_allocated`` over the whole run on both sides
(max RSS on CPU). Ours' own logged figures (tokens with padding) are reported beside.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LR = 3e-4
ENV_DROP = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")  # a world of one per part
TIMEOUTS = {"data": 90, "ours": 270, "hf": 210}
SMOKE = dict(conversations=24, synth_workers=2, data_workers=0, seq_length=512, micro_batch=1, global_batch=2,
             steps=3, warmup=1, deadline=900, timeouts={"data": 120, "ours": 400, "hf": 300})
OURS_FIELDS = ("loss", "tokens_per_s", "tflops_per_device", "mfu", "peak_memory_gib", "pad_fraction")


# --------------------------------------------------------------------------------------------------
# The two sides' configurations.


def ours_overrides(args, data_dir: Path, run_dir: Path) -> list:
    """``recipe=tiny/sft`` at the benchmark's sizes, lengths and data; the transformers side composes the
    same list to replay the data stream and size its model."""
    o = ["recipe=tiny/sft", "init_from=null", f"run_dir={run_dir}", "logger=none",
         f"data.datasets=[{{path: {data_dir / 'sft'}, weight: 1.0}}]", f"data.tokenizer={data_dir / 'tokenizer'}",
         f"data.num_workers={args.data_workers}",
         f"trainer.seq_length={args.seq_length}", f"trainer.micro_batch_size={args.micro_batch}",
         f"trainer.global_batch_size={args.global_batch}", f"trainer.max_steps={args.steps}",
         "trainer.log_every=1", f"trainer.seed={args.seed}",
         f"optim.lr={LR}", "optim.warmup_steps=0", "optim.lr_decay=constant",  # as the transformers side
         "checkpoint.save_at_end=false", "checkpoint.save_every=100000",
         "model.thinker.aux_loss_coeff=0"]  # no load-balancing loss on either side
    if args.smoke:  # tiny_omni (the recipe's model) in fp32 on the CPU
        o += ["trainer.device=cpu", "trainer.precision=fp32"]
    else:  # the omni proxy of RESULTS.md (thinker_throughput.py's ours_omni)
        o += ["model=qwen3_omni_30b_a3b", "model.thinker.towers=true", f"model.thinker.num_layers={args.layers}",
              f"model.thinker.num_experts={args.experts}", "trainer.device=cuda", "trainer.precision=bf16"]
    if not args.master_weights:
        o += ["optim.master_weights=false", "parallel.distributed_optimizer=false"]
    return o + args.ours_overrides.split()


def model_and_flops(overrides: list):
    """(the run's ThinkerConfig, LM training FLOPs per token at its seq_length)."""
    from omegaconf import OmegaConf

    from omni_train.config import compose
    from omni_train.metrics import flops_per_token

    cfg = OmegaConf.to_object(compose(overrides))
    return cfg.model.thinker, flops_per_token(cfg.model.thinker, cfg.trainer.seq_length)


# --------------------------------------------------------------------------------------------------
# Transformers side (a worker process): replay our data stream, then train on it one conversation at a time.


def item_tower_flops(m, item) -> float:
    from omni_train.metrics import audio_tower_flops, vision_tower_flops

    f = item.features
    if item.kind == "audio":
        return audio_tower_flops(m, int(f["num_frames"]))
    flops = vision_tower_flops(m, f["grid_thw"])
    return flops + (audio_tower_flops(m, int(f["audio"]["num_frames"])) if "audio" in f else 0.0)


def conversations(seq, m) -> list:
    """A packed sequence (data.packing.PackedSequence) cut back into its documents: tokens, TM-RoPE ids,
    labels (-100 where the loss mask is 0; already the next token) and collated media of each."""
    import torch

    from omni_train.data.media_batch import collate_media

    bounds = seq.cu_seqlens.tolist()
    docs = []
    for d, key in enumerate(seq.keys):  # one key per document piece; padding, if any, is the last segment
        a, b = bounds[d], bounds[d + 1]
        items = [item for item, (s, e) in zip(seq.media, seq.media_spans) if a <= s and e <= b]
        keep = seq.loss_mask[a:b] > 0
        docs.append(dict(key=key, input_ids=seq.input_ids[a:b], position_ids=seq.position_ids[:, a:b],
                         labels=torch.where(keep, seq.labels[a:b], torch.full_like(seq.labels[a:b], -100)),
                         media={k: v for k, v in collate_media(items).items() if v is not None},
                         kinds=[item.kind for item in items], targets=int(keep.sum()),
                         tower_flops=sum(item_tower_flops(m, item) for item in items)))
    return docs


def replay(cfg, steps: int):
    """The batches our trainer consumed: the stage's data source built as the Session builds it (dp rank 0 of
    1), read in the same order (next_microbatches takes global_batch sequences a step, in turn). Returns
    (conversations per step, each step's data figures, seconds the source took)."""
    from types import SimpleNamespace

    from omni_train.stages import load_stage

    stage = load_stage(cfg.stage)  # its imports (megatron) before the clock starts
    start = time.perf_counter()
    source = stage.build_data(cfg, SimpleNamespace(dp_rank=0, dp_size=1))
    per_step, stats = [], []
    for _ in range(steps):
        # _next_sequence: the packed sequences before collation, whose media are still per item
        seqs = [source._next_sequence() for _ in range(cfg.trainer.global_batch_size)]
        docs = [doc for seq in seqs for doc in conversations(seq, cfg.model.thinker)]
        per_step.append(docs)
        kinds = [k for doc in docs for k in doc["kinds"]]
        stats.append(dict(conversations=len(docs), tokens=sum(len(d["input_ids"]) for d in docs),
                          pad_tokens=sum(s.num_pad for s in seqs), targets=sum(d["targets"] for d in docs),
                          media={k: kinds.count(k) for k in sorted(set(kinds))},
                          tower_flops=sum(d["tower_flops"] for d in docs)))
    seconds = time.perf_counter() - start
    source.loader.close()  # its DataLoader workers would compete with the timed steps for the CPU
    return per_step, stats, seconds


def build_hf(cfg, device, experts: str):
    """transformers' Thinker of the run's sizes, explicitly initialised (no parameter left as torch.empty)."""
    import torch
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    from omni_train.data.shards import chat_encoder
    from throughput_variants import _tower_parameters, hf_thinker_config  # benchmarks/, this script's folder

    m, ids = cfg.model.thinker, chat_encoder(cfg.data).ids
    torch.manual_seed(cfg.trainer.seed)
    for impl in dict.fromkeys([experts, "eager"]):  # eager where this transformers lacks the one asked for
        try:
            with torch.device(device):
                model = Qwen3OmniMoeThinkerForConditionalGeneration._from_config(
                    hf_thinker_config(m, impl, ids), dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                    attn_implementation="sdpa", experts_implementation=impl)
            break
        except (ValueError, TypeError, ImportError, NotImplementedError) as e:
            print(f"experts implementation {impl!r} unavailable ({type(e).__name__}: {e})", flush=True)
    else:
        raise RuntimeError("transformers' Thinker could not be built (see above)")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norm weights 1, biases 0
                p.fill_(1.0 if ("norm" in name or ".ln_" in name) and name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, m.init_std)
    model.train()
    info = dict(parameters=sum(p.numel() for p in model.parameters()), tower_parameters=_tower_parameters(model),
                experts_implementation=model.config.text_config._experts_implementation,
                attn_implementation=model.config.text_config._attn_implementation, optimizer="AdamW(fused)")
    return model, info


def hf_step(model, optimizer, params, docs, clip: float, device):
    """One optimizer step over a step's conversations, one forward each; the loss of each is its summed
    target NLL over the step's target count (our normalisation: per target token of the global batch)."""
    import torch
    import torch.nn.functional as F

    targets = max(1, sum(d["targets"] for d in docs))
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for doc in docs:  # copied to the device inside the step, as our loop copies its batches
        media = {k: v.to(device) for k, v in doc["media"].items()}
        logits = model(input_ids=doc["input_ids"].to(device)[None], position_ids=doc["position_ids"].to(device)[:, None],
                       use_cache=False, **media).logits[0]
        loss = F.cross_entropy(logits.float(), doc["labels"].to(device), ignore_index=-100, reduction="sum")
        (loss / targets).backward()
        total += loss.detach()
    torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    optimizer.step()
    return total / targets


def hf_worker(spec: dict, result_path: Path) -> None:
    import logging
    import warnings

    import torch
    from omegaconf import OmegaConf

    from omni_train.config import compose
    from omni_train.metrics import peak_memory_gib

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    cfg = OmegaConf.to_object(compose(spec["overrides"]))
    result = dict(status="replaying data")
    write = lambda: result_path.write_text(json.dumps(result))  # noqa: E731  (after every part: a kill loses nothing)
    steps, stats, seconds = replay(cfg, spec["steps"])
    result.update(data=dict(steps=stats, replay_s=seconds, loader_workers=cfg.data.num_workers), status="building")
    write()
    print(f"replayed {spec['steps']} steps of our data in {seconds:.1f}s: "
          f"{[s['conversations'] for s in stats]} conversations a step", flush=True)
    start = time.perf_counter()
    model, info = build_hf(cfg, device, spec["hf_experts"])
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
                                  fused=device.type == "cuda", foreach=None if device.type == "cuda" else True)
    result.update(info, build_s=time.perf_counter() - start, status="running", step_times_s=[], losses=[])
    write()
    print(f"built in {result['build_s']:.1f}s: {info}", flush=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    for i, docs in enumerate(steps):
        t0 = time.perf_counter()
        loss = float(hf_step(model, optimizer, params, docs, o.clip_grad, device))  # .item(): the step's end
        sync()
        result["step_times_s"].append(time.perf_counter() - t0)
        result["losses"].append(loss)
        result["peak_memory_gib"] = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                                     else peak_memory_gib(device))
        write()
        print(f"step {i + 1}: {result['step_times_s'][-1]:.3f}s, loss {loss:.4f}, {len(docs)} conversations, "
              f"peak {result['peak_memory_gib']:.1f} GiB", flush=True)
    result["status"] = "ok"
    write()


# --------------------------------------------------------------------------------------------------
# Parent: the parts in subprocesses, then the figures.


def run_part(name: str, cmd: list, timeout: float, log_path: Path, label: str = "") -> str:
    """Run ``cmd`` in its own process group, its output to ``log_path`` and, line by line, to stdout
    (``show`` decides how); killed with its group (its loader workers too) after ``timeout`` seconds."""
    if timeout < 10:
        print(f"== {name}: skipped (deadline)", flush=True)
        return "skipped (deadline)"
    print(f"== {name} (timeout {timeout:.0f}s): {label or ' '.join(cmd[1:])}", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                env=env, start_new_session=True)

        def pump():
            for line in proc.stdout:
                log.write(line)
                shown = show(line.rstrip())
                if shown:
                    print(f"[{name}] {shown}", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this call started
            proc.wait()
            status = f"timeout ({timeout:.0f}s)"
        reader.join(10)
    print(f"== {name}: {status} after {time.perf_counter() - start:.0f}s (log {log_path})", flush=True)
    if status != "ok":
        print(*log_path.read_text(errors="replace").splitlines()[-15:], sep="\n  ", flush=True)
    return status


def show(line: str):
    """A console line of a part, shortened: the trainer's metric lines ("step=1 | loss=... | ...") to the
    figures this benchmark reads."""
    if line.startswith("step=") and " | " in line:
        fields = dict(part.split("=", 1) for part in line.split(" | ") if "=" in part)
        return " ".join(f"{k}={fields[k]}" for k in ("step",) + OURS_FIELDS if k in fields)
    return line[:300] if line.strip() else None


def step_figures(times: list, tokens: list, tower_flops, fpt: float, peak, warmup: int) -> dict:
    """Per timed step (after ``warmup``): real tokens/s, LM TFLOP/s, LM + towers TFLOP/s (``tower_flops``
    None: unknown); their medians, and MFU."""
    timed = range(warmup, min(len(times), len(tokens)))
    if not timed:
        return {}
    rate = [tokens[i] / times[i] for i in timed]
    out = dict(steps_timed=len(rate), step_s=statistics.median(times[i] for i in timed),
               tokens_per_s=statistics.median(rate), tflops=statistics.median(r * fpt / 1e12 for r in rate))
    out["mfu"] = out["tflops"] * 1e12 / peak if peak else None
    if tower_flops is not None:
        out["total_tflops"] = statistics.median((tokens[i] * fpt + tower_flops[i]) / times[i] / 1e12 for i in timed)
        out["total_mfu"] = out["total_tflops"] * 1e12 / peak if peak else None
    return out


def ours_result(run_dir: Path, status: str, data: list, args, fpt: float, peak) -> dict:
    """Ours' metrics.jsonl -> step times, real tokens per step (from the replay of the same stream, else
    estimated from the cumulative pad fraction) and figures; ``same_data``: its target counts equal the
    replay's, step by step."""
    from omni_train.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.exists() else []
    per_step = args.global_batch * args.seq_length  # what the trainer counts in its tokens/s (padding included)
    times = [per_step / r["tokens_per_s"] for r in rows]
    targets = [int(sum(v for k, v in r.items() if k.startswith("loss_") and k.endswith("_count"))) for r in rows]
    same = bool(data) and all(t == d["targets"] for t, d in zip(targets, data))
    if same:
        tokens, towers = [d["tokens"] for d in data], [d["tower_flops"] for d in data]
    else:  # no replay to match: the pad fraction the packer logs (cumulative over the sequences it emitted)
        tokens, towers = [per_step * (1 - r.get("pad_fraction", 0.0)) for r in rows], None
    timed = rows[args.warmup:]
    own = {f"logged_{k}": statistics.median(r[k] for r in timed) for k in OURS_FIELDS[1:4] if timed and k in timed[0]}
    return dict(status=status if rows or status != "ok" else "ok, but no metrics", run_dir=str(run_dir),
                step_times_s=times, losses=[r["loss"] for r in rows], targets=targets, same_data=same,
                peak_memory_gib=max((r.get("peak_memory_gib", 0.0) for r in rows), default=None),
                pad_fraction=rows[-1].get("pad_fraction") if rows else None,
                figures=dict(step_figures(times, tokens, towers, fpt, peak, args.warmup), **own),
                metrics=[{k: r.get(k) for k in ("step",) + OURS_FIELDS} for r in rows])


def hf_result(result: dict, status: str, data: list, args, fpt: float, peak) -> dict:
    result = dict(result, status=status if status != "ok" else result.get("status", "?"))
    times = result.get("step_times_s", [])
    result["figures"] = step_figures(times, [d["tokens"] for d in data], [d["tower_flops"] for d in data],
                                     fpt, peak, args.warmup)
    result.pop("data", None)
    return result


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def table(report: dict) -> str:
    head = ["side", "status", "steps", "step s", "tokens/s", "TFLOP/s", "MFU", "total MFU", "peak GiB",
            "loss first->last"]
    rows = []
    for side in ("ours", "transformers"):
        r = report.get(side) or {}
        f, losses = r.get("figures") or {}, r.get("losses") or []
        pct = lambda x: "-" if x is None else f"{100 * x:.2f}%"  # noqa: E731
        rows.append([side, r.get("status", "-"), _fmt(f.get("steps_timed"), "d"), _fmt(f.get("step_s"), ".3f"),
                     _fmt(f.get("tokens_per_s"), ",.0f"), _fmt(f.get("tflops"), ".4g"), pct(f.get("mfu")),
                     pct(f.get("total_mfu")), _fmt(r.get("peak_memory_gib"), ".1f"),
                     f"{losses[0]:.3f}->{losses[-1]:.3f}" if losses else "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |" for row in [head] + rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def summary_lines(report: dict) -> list:
    out = [f"model: {report['model']}", f"LM FLOPs/token {report['flops_per_token'] / 1e9:.3f} G at seq_length "
           f"{report['args']['seq_length']}; peak {_fmt(report['peak_flops'] and report['peak_flops'] / 1e12, '.0f')} "
           "TFLOP/s"]
    data, ours, hf = report.get("data"), report.get("ours") or {}, report.get("transformers") or {}
    if data:
        steps = data["steps"]
        out.append(f"data: {[s['conversations'] for s in steps]} conversations, {[s['tokens'] for s in steps]} real "
                   f"tokens, {[s['targets'] for s in steps]} targets per step; media {steps[0]['media']} (step 1); "
                   f"replay {data['replay_s']:.1f}s for {len(steps)} steps with {data['loader_workers']} loader workers")
    if ours:
        f = ours.get("figures", {})
        out.append(f"ours: same conversations as the replay: {ours.get('same_data')}; logged (tokens with padding, "
                   f"median): tokens/s {_fmt(f.get('logged_tokens_per_s'), ',.0f')}, TFLOP/s "
                   f"{_fmt(f.get('logged_tflops_per_device'), '.2f')}, MFU {_fmt(f.get('logged_mfu'), '.4f')}; pad "
                   f"fraction {_fmt(ours.get('pad_fraction'), '.4f')}; step times {[round(t, 3) for t in ours.get('step_times_s', [])]}")
    if data and ours.get("figures", {}).get("step_s"):  # DataLoader workers slower than the trainer's steps?
        out.append(f"loader: the replay made a step's data every {data['replay_s'] / len(data['steps']):.3f}s with "
                   f"{data['loader_workers']} workers (decode, encode, pack; no model); ours' median step "
                   f"{ours['figures']['step_s']:.3f}s (the first near or above the second: ours likely waited for data)")
    if hf.get("step_times_s"):
        out.append(f"transformers ({hf.get('experts_implementation')} experts, {hf.get('attn_implementation')}): "
                   f"step times {[round(t, 3) for t in hf['step_times_s']]}")
    if report.get("ratio") is not None:
        out.append(f"tokens/s ratio ours / transformers: {report['ratio']:.2f}")
    return out


def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "megatron.core"):
        try:
            out[name] = __import__(name, fromlist=["_"]).__version__
        except ImportError:
            out[name] = None
    return out


def run_all(args) -> dict:
    import torch

    from omni_train.metrics import device_peak_flops

    start, work = time.perf_counter(), Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    left = lambda part: min(args.timeouts.get(part, TIMEOUTS[part]), args.deadline - (time.perf_counter() - start))  # noqa: E731
    data_dir = Path(args.data_dir) if args.data_dir else work / "data"
    run_dir = Path(tempfile.mkdtemp(prefix="ours_", dir=work))  # fresh: an old run would be resumed
    overrides = ours_overrides(args, data_dir, run_dir)
    model, fpt = model_and_flops(overrides)
    peak = device_peak_flops() if torch.cuda.is_available() else None
    report = dict(date=time.strftime("%Y-%m-%d"), args=vars(args), overrides=overrides, flops_per_token=fpt,
                  peak_flops=peak, versions=versions(),
                  device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  model=dict(layers=model.num_layers, hidden=model.hidden_size, experts=model.num_experts,
                             topk=model.router_topk, vocab=model.vocab_size,
                             audio_layers=model.audio_tower.num_layers, vision_depth=model.vision_tower.depth))
    if not (args.reuse_data and (data_dir / "sft").is_dir()):
        status = run_part("data", [sys.executable, "-m", "data_pipelines.cli", "synth-suite", str(data_dir),
                                   f"sft={args.conversations}", "--workers", str(args.synth_workers)],
                          left("data"), work / "data.log")
        if status != "ok":
            report["data_status"] = status
            return report
    ours_status = "skipped"
    if "ours" in args.which:
        ours_status = run_part("ours", [sys.executable, "-m", "omni_train.train", *overrides], left("ours"),
                               work / "ours.log")
    hf_status, hf = "skipped", {}
    if "hf" in args.which:
        result_path = work / "hf_result.json"
        result_path.unlink(missing_ok=True)
        spec = dict(overrides=overrides, steps=args.steps, hf_experts=args.hf_experts)
        hf_status = run_part("transformers", [sys.executable, str(Path(__file__).resolve()), "--hf-worker",
                                              "--spec", json.dumps(spec), "--result", str(result_path)],
                             left("hf"), work / "hf.log", label=f"the same overrides, {args.hf_experts} experts")
        hf = json.loads(result_path.read_text()) if result_path.exists() else {}
    data = (hf.get("data") or {}).get("steps", [])
    report["data"] = hf.get("data")
    report["ours"] = ours_result(run_dir, ours_status, data, args, fpt, peak) if "ours" in args.which else None
    report["transformers"] = hf_result(hf, hf_status, data, args, fpt, peak) if "hf" in args.which else None
    a, b = ((report.get(s) or {}).get("figures", {}).get("tokens_per_s") for s in ("ours", "transformers"))
    report["ratio"] = a / b if a and b else None
    return report


def _timeouts(text: str) -> dict:
    return {k: float(v) for k, v in (item.split("=") for item in text.split(",") if item)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU check of the logic: " + json.dumps(SMOKE))
    p.add_argument("--conversations", type=int, default=512, help="synthetic SFT conversations (data kind sft)")
    p.add_argument("--synth-workers", type=int, default=8)
    p.add_argument("--data-workers", type=int, default=12,
                   help="our loader's workers (data.num_workers); the replay uses as many (the stream depends on it)")
    p.add_argument("--seq-length", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--global-batch", type=int, default=1, help="packed sequences per optimizer step")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the medians")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--master-weights", action="store_true",
                   help="ours with fp32 master weights and the distributed optimizer (default: bf16, as transformers)")
    p.add_argument("--hf-experts", default="grouped_mm", help="transformers' experts implementation")
    p.add_argument("--ours-overrides", default="", help="more Hydra overrides for ours, space-separated")
    p.add_argument("--which", default="ours,hf", type=lambda s: [v for v in s.split(",") if v])
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeouts", default="", type=_timeouts, help=f"per part, e.g. ours=300 (default {TIMEOUTS})")
    p.add_argument("--deadline", type=float, default=480, help="seconds for all parts together")
    p.add_argument("--work-dir", default="/tmp/sft_throughput", help="data, run directory, logs")
    p.add_argument("--data-dir", default=None, help="default: WORK_DIR/data")
    p.add_argument("--reuse-data", action="store_true", help="keep DATA_DIR/sft if it exists")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:  # the smoke sizes, unless given on the command line
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        for key, value in SMOKE.items():
            if key not in given:
                setattr(args, key, value)
    return args


def main(argv=None) -> int:
    from omni_train.compat import quiet_library_warnings

    quiet_library_warnings()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.hf_worker:
        hf_worker(json.loads(args.spec), Path(args.result))
        return 0
    report = run_all(args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    print("\n".join(summary_lines(report)), flush=True)
    print(table(report), flush=True)
    return 0 if all((report.get(s) or {}).get("status", "ok") == "ok" for s in ("ours", "transformers")) else 1


if __name__ == "__main__":
    sys.exit(main())
