"""`omni-data stats`: what a dataset holds, from index.json or recounted from the shards."""

from data_pipelines import shards
from data_pipelines.samples import rounded_stats


def dataset_stats(directory, recount=False):
    """{"num_samples", "num_shards", "modalities", "audio_hours", "images", "video_minutes"}."""
    if recount:
        from data_pipelines.validate import scan_dataset

        scan = scan_dataset(directory, check_files=False)
        num_samples, num_shards, modalities = scan.num_samples, scan.num_shards, rounded_stats(scan.stats)
    else:
        index = shards.read_index(directory)
        num_samples, num_shards, modalities = index["num_samples"], len(index["shards"]), index["modalities"]
    return {
        "num_samples": num_samples,
        "num_shards": num_shards,
        "modalities": modalities,
        "audio_hours": modalities["audio"]["seconds"] / 3600,
        "images": modalities["image"]["items"],
        "video_minutes": modalities["video"]["seconds"] / 60,
    }


def format_stats(stats):
    m = stats["modalities"]
    lines = [
        f"samples        {stats['num_samples']} in {stats['num_shards']} shards",
        f"audio          {m['audio']['items']} items, {stats['audio_hours']:.4f} hours",
        f"images         {stats['images']}",
        f"video          {m['video']['items']} items, {stats['video_minutes']:.3f} minutes",
        "estimated tokens:",
    ]
    lines += [f"  {kind:<12} {m[kind]['tokens']}" for kind in ("text", "audio", "image", "video")]
    lines.append(f"  {'total':<12} {sum(m[k]['tokens'] for k in m)}")
    return "\n".join(lines)
