"""Data-loader throughput per CPU core: shards -> read -> decode -> features -> chat encode -> pack -> micro-batches.

Builds three datasets of real media (data_pipelines.synth helpers + build): ASR-like audio, image captioning,
video with an AAC track (use_audio_in_video). Then per mix, in this one process (num_workers=0, one torch
thread as in a DataLoader worker; process_time is reported next to wall time, since PyAV may use threads):

1. end to end: omni_train.data.shards.ShardSource (the trainer's path, dense document mask included) at
   seq_length 4096, micro-batch 1, measured after a warm-up that fills the packer's open bins;
2. stages: one pass over the dataset timing read, decode (resampling apart), features, chat encode,
   pack+collate, dense mask;
3. steady-state packing efficiency at 4096 and 32768 (encoded documents cycled, media payloads dropped).

    python benchmarks/data_loader.py [--samples N] [--workdir DIR] [--out PATH]
"""
import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_pipelines.build import BuildOptions, build  # noqa: E402
from data_pipelines.sources import ManifestSource  # noqa: E402
from data_pipelines.synth import draw_image, write_audio, write_video  # noqa: E402
from omni_train.config import DatasetConfig, ShardsDataConfig  # noqa: E402
from omni_train.data import chat as chat_mod  # noqa: E402
from omni_train.data import decode as decode_mod  # noqa: E402
from omni_train.data.decode import decode_sample  # noqa: E402
from omni_train.data.packing import Document, SequencePacker, collate_packed  # noqa: E402
from omni_train.data.shards import ShardSource  # noqa: E402
from omni_train.models.common.attention import document_attention_mask  # noqa: E402
from omni_train.data.stream import ShardStream  # noqa: E402

WORDS = ("the a to and of in is it that was for on are with as his they be at one have this from or had by word "
         "but what some we can out other were all there when up use your how said an each she which do their time "
         "if will way about many then them write would like so these her long make thing see him two has look more "
         "day could go come did number sound no most people my over know water than call first who may down side "
         "been now find red blue green dog park car house river light small large").split()
FEATURE_FNS = ("audio_features", "image_patches", "video_patches")
STAGES = ("read", "decode", "resample", "features", "chat_encode", "pack", "mask")
VIDEO_FPS = 2.0  # DataConfig.video_fps default: frames sampled per second of video
# GPU consumption rates (tokens/s per GPU): measured tiny MoE, and the 30B-A3B estimate (4-layer slice x 4/48)
GPU_RATES = {"h100_tiny_moe_290M": 26400.0, "h100_qwen3_omni_30b_a3b_48L": 56059.0 * 4 / 48}


def text(t):
    return {"type": "text", "text": t}


def make_entry(args):
    kind, i, src, video_src_fps = args
    rng = np.random.default_rng([11, "acv".index(kind[0]), i])
    say = lambda n: " ".join(rng.choice(WORDS, size=max(1, int(n))))  # noqa: E731
    if kind == "asr":  # 5-15 s speech-like audio, a quarter at 44.1 kHz (resampled on decode)
        seconds, rate = float(rng.uniform(5, 15)), 44100 if i % 4 == 3 else 16000
        write_audio(os.path.join(src, f"{i}.flac"), rng, seconds, rate)
        user = [{"type": "audio", "audio": f"{i}.flac"}, text("Transcribe the audio.")]
        answer = say(seconds * 2.5)
    elif kind == "caption":  # 640x480, a quarter png
        fmt, ext = ("PNG", "png") if i % 4 == 3 else ("JPEG", "jpg")
        pixels = np.asarray(draw_image(rng, 640, 480)) + rng.normal(0, 4, (480, 640, 3))  # photo-like entropy
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
            os.path.join(src, f"{i}.{ext}"), format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        user = [{"type": "image", "image": f"{i}.{ext}"}, text("Describe the image in detail.")]
        answer = say(rng.integers(20, 60))
    else:  # 4-8 s 640x360 H.264 with an AAC track (16 or 44.1 kHz), audio used as audio-in-video
        write_video(os.path.join(src, f"{i}.mp4"), rng, seconds=int(rng.integers(4, 9)), fps=video_src_fps,
                    width=640, height=360, audio_rate=44100 if i % 2 else 16000)
        user = [{"type": "video", "video": f"{i}.mp4", "use_audio_in_video": True},
                text("What happens in the video, and what is said?")]
        answer = say(rng.integers(15, 40))
    return {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def build_dataset(kind, n, root, video_src_fps, pool):
    out, src = os.path.join(root, kind), os.path.join(root, kind + "_src")
    index = os.path.join(out, "index.json")
    if os.path.exists(index) and json.load(open(index))["num_samples"] == n:
        return out, [json.loads(l) for l in open(os.path.join(src, "manifest.jsonl"))], 0.0
    t = time.perf_counter()
    os.makedirs(src, exist_ok=True)
    entries = pool.map(make_entry, [(kind, i, src, video_src_fps) for i in range(n)])
    with open(os.path.join(src, "manifest.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)
    build(ManifestSource(os.path.join(src, "manifest.jsonl")), out,
          BuildOptions(samples_per_shard=max(8, n // 4), workers=2, progress=False))
    return out, entries, time.perf_counter() - t


class Clock:
    """Wall and CPU seconds per stage."""

    def __init__(self):
        self.wall, self.cpu = {}, {}

    def wrap(self, name, fn):
        def timed(*a, **k):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
        return timed


def media_seconds(media_items):
    """Seconds of audio/video in chat MediaItems (features carry the lengths)."""
    total = 0.0
    for m in media_items:
        if m.kind == "audio":
            total += m.features["num_frames"] / 100.0  # hop 160 at 16 kHz
        elif m.kind == "video":
            total += m.features["grid_thw"][0] * m.features["second_per_grid"]
    return total


def staged_pass(path, encoder, n, seq_length):
    clock, docs, tokens, secs = Clock(), [], 0, 0.0
    originals = {k: getattr(chat_mod, k) for k in FEATURE_FNS}
    for k, f in originals.items():  # time the feature functions inside ChatEncoder.encode
        setattr(chat_mod, k, clock.wrap("features", f))
    resample = decode_mod.resample_audio  # and resampling inside decode (audio files, video tracks)
    decode_mod.resample_audio = clock.wrap("resample", resample)
    stream = ShardStream(path, shuffle=False)
    packer = SequencePacker(seq_length, pad_id=encoder.tokenizer.pad_token_id)
    read, decode = clock.wrap("read", lambda: next(stream)), clock.wrap("decode", decode_sample)
    encode, add = clock.wrap("encode", encoder.encode), clock.wrap("pack", packer.add)
    collate, mask = clock.wrap("pack", collate_packed), clock.wrap("mask", document_attention_mask)
    try:
        seqs = []
        for _ in range(n):
            enc = encode(decode(read(), video_fps=VIDEO_FPS))
            doc = Document.from_encoded(enc)
            seqs += add(doc)
            tokens, secs = tokens + len(doc.input_ids), secs + media_seconds(enc.media)
            docs.append(Document(doc.input_ids, doc.loss_mask, doc.position_ids, doc.media_spans,
                                 [m.kind for m in doc.media], doc.key))  # no pixel/mel payloads kept
            for s in seqs:
                mask(collate([s])["document_ids"])
            seqs = []
        for s in clock.wrap("pack", packer.flush)():
            mask(collate([s])["document_ids"])
    finally:
        for k, f in originals.items():
            setattr(chat_mod, k, f)
        decode_mod.resample_audio = resample
    for d in (clock.wall, clock.cpu):
        d["chat_encode"] = d.pop("encode") - d.get("features", 0.0)
        d["decode"] -= d.get("resample", 0.0)
    order = STAGES
    stages = {k: {"wall_ms_per_sample": 1e3 * clock.wall.get(k, 0) / n,
                  "cpu_ms_per_sample": 1e3 * clock.cpu.get(k, 0) / n} for k in order}
    cpu_total = sum(clock.cpu.values())
    for k in order:
        stages[k]["cpu_share"] = clock.cpu.get(k, 0) / cpu_total
    return {"samples": n, "tokens_per_sample": tokens / n, "media_seconds_per_sample": secs / n,
            "stages": stages, "bottleneck": max(order, key=lambda k: clock.cpu.get(k, 0))}, docs


def steady_packing(docs, seq_length, pad_id, min_sequences=24, seed=0):
    """1 - pad fraction over sequences emitted while documents keep coming (no final flush)."""
    packer, rng, emitted = SequencePacker(seq_length, pad_id=pad_id), random.Random(seed), 0
    order = list(range(len(docs)))
    w = time.perf_counter()
    while emitted < min_sequences:
        rng.shuffle(order)
        for i in order:
            for s in packer.add(docs[i]):
                collate_packed([s])
                emitted += 1
    wall = time.perf_counter() - w
    return {"efficiency": 1 - packer.pad_fraction, "sequences": emitted,
            "pack_collate_tokens_per_s": packer.stats["tokens"] / wall}


def end_to_end(paths, tokenizer, n, seq_length, min_sequences=16, max_seconds=60.0):
    cfg = ShardsDataConfig(datasets=[DatasetConfig(path=p, weight=1.0) for p in paths],
                     tokenizer=tokenizer, num_workers=0, video_fps=VIDEO_FPS)
    src = ShardSource(cfg, seq_length, micro_batch=1, num_micro_batches=1, dp_rank=0, dp_size=1)
    src.next_microbatches()  # warm-up: the packer's open bins fill before the first sequence leaves
    seen0, stats0 = src.loader.stats()["seen"], dict(src.packer.stats)
    w, c, secs, batches = time.perf_counter(), time.process_time(), 0.0, 0
    while (src.loader.stats()["seen"] - seen0 < n or batches < min_sequences) and time.perf_counter() - w < max_seconds:
        for batch in src.next_microbatches():
            secs += media_seconds(batch["media"])
            batches += 1
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    st = src.packer.stats
    seqs, pad = st["sequences"] - stats0["sequences"], st["pad_tokens"] - stats0["pad_tokens"]
    samples, tokens = src.loader.stats()["seen"] - seen0, seqs * seq_length - pad
    return {"seq_length": seq_length, "samples": samples, "sequences": seqs, "wall_s": wall, "cpu_s": cpu,
            "cores_used": cpu / wall, "samples_per_s": samples / wall, "tokens_per_s": tokens / wall,
            "tokens_per_cpu_s": tokens / cpu, "media_seconds_per_s": secs / wall,
            "packing_efficiency": 1 - pad / (seqs * seq_length), "skipped": src.loader.stats()["skipped"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=96, help="samples per dataset")
    ap.add_argument("--workdir", help="where datasets are built (reused when present); default: a temp dir")
    ap.add_argument("--out", default="benchmarks/data_loader_results.json")
    ap.add_argument("--video-src-fps", type=int, default=8, help="frame rate of the synthetic mp4s")
    args = ap.parse_args()
    torch.set_num_threads(1)  # what a DataLoader worker runs with
    t_start = time.perf_counter()
    root = args.workdir or tempfile.mkdtemp(prefix="omni-dl-bench-")
    os.makedirs(root, exist_ok=True)
    kinds = ("asr", "caption", "video")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        built = {k: build_dataset(k, args.samples, root, args.video_src_fps, pool) for k in kinds}
    texts = [p if isinstance(p, str) else p.get("text", "") for _, es, _ in built.values() for e in es
             for m in e["messages"] for p in ([m["content"]] if isinstance(m["content"], str) else m["content"])]
    tok_dir = os.path.join(root, "tokenizer")
    chat_mod.build_test_tokenizer(tok_dir, extra_texts=texts, vocab_size=2048)
    encoder = chat_mod.ChatEncoder.from_pretrained(tok_dir)
    pad_id = encoder.tokenizer.pad_token_id
    results = {"config": {"samples_per_dataset": args.samples, "workdir": root, "video_src_fps": args.video_src_fps,
                          "video_sampled_fps": VIDEO_FPS, "torch_threads": torch.get_num_threads(),
                          "cpu": os.cpu_count(), "build_s": {k: v[2] for k, v in built.items()}},
               "gpu_tokens_per_s": GPU_RATES, "mixes": {}}
    mixes = {k: [built[k][0]] for k in kinds}
    mixes["all_1:1:1"] = [built[k][0] for k in kinds]
    for name, paths in mixes.items():
        r = {"e2e_4096": end_to_end(paths, tok_dir, args.samples, 4096)}
        if len(paths) == 1:
            r["staged"], docs = staged_pass(paths[0], encoder, args.samples, 4096)
            r["steady_packing"] = {L: steady_packing(docs, L, pad_id) for L in (4096, 32768)}
        cpu_per_tok = 1 / r["e2e_4096"]["tokens_per_cpu_s"]
        r["cores_per_gpu"] = {g: rate * cpu_per_tok for g, rate in GPU_RATES.items()}
        results["mixes"][name] = r
        print(f"[{time.perf_counter() - t_start:6.1f}s] {name}: {json.dumps(r['e2e_4096'])}", file=sys.stderr)
    w = time.perf_counter()
    document_attention_mask(torch.zeros(1, 32768, dtype=torch.long))  # dense [1,1,L,L] mask at long context
    results["dense_mask_32768_s_per_sequence"] = time.perf_counter() - w
    results["total_s"] = time.perf_counter() - t_start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print_tables(results)
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


def print_tables(res):
    print("\n| mix | samples/s | tokens/s | media s/s | CPU cores used | tokens/CPU-s | pack eff. e2e 4096 "
          "| steady eff. 4096 | steady eff. 32768 | tokens/sample |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in res["mixes"].items():
        e, sp, st = r["e2e_4096"], r.get("steady_packing", {}), r.get("staged", {})
        eff = lambda L: f"{sp[L]['efficiency']:.1%}" if L in sp else "-"  # noqa: E731
        print(f"| {name} | {e['samples_per_s']:.1f} | {e['tokens_per_s']:,.0f} | {e['media_seconds_per_s']:.1f} "
              f"| {e['cores_used']:.2f} | {e['tokens_per_cpu_s']:,.0f} | {e['packing_efficiency']:.1%} | {eff(4096)} "
              f"| {eff(32768)} | {st.get('tokens_per_sample', float('nan')):.0f} |")
    stages = STAGES
    print("\nCPU ms per sample by stage (share of CPU):\n\n| mix | " + " | ".join(stages) + " | bottleneck |")
    print("|---|" + "---|" * (len(stages) + 1))
    for name, r in res["mixes"].items():
        if "staged" in r:
            s = r["staged"]["stages"]
            cells = [f"{s[k]['cpu_ms_per_sample']:.1f} ({s[k]['cpu_share']:.0%})" for k in stages]
            print(f"| {name} | " + " | ".join(cells) + f" | {r['staged']['bottleneck']} |")
    print("\nCPU cores per GPU to keep up (e2e CPU-s per token x GPU tokens/s):\n\n| mix | "
          + " | ".join(f"{g} ({v:,.0f} tok/s)" for g, v in res["gpu_tokens_per_s"].items()) + " |")
    print("|---|" + "---|" * len(res["gpu_tokens_per_s"]))
    for name, r in res["mixes"].items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in r["cores_per_gpu"].values()) + " |")
    print(f"\ndense document mask at 32768: {res['dense_mask_32768_s_per_sequence']:.1f} s per sequence; "
          f"total {res['total_s']:.0f} s")


if __name__ == "__main__":
    main()
