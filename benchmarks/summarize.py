"""Summarise a run's metrics.jsonl: mean throughput / MFU over the logged steps after the first."""

import json
import statistics
import sys

records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
steady = records[1:] or records
for key in ("tokens_per_s", "tflops_per_device", "mfu", "peak_memory_gib"):
    values = [r[key] for r in steady if key in r]
    if values:
        print(f"{key}: mean {statistics.mean(values):.4g} (min {min(values):.4g}, max {max(values):.4g})")
print(f"loss: step {records[0]['step']} {records[0]['loss']:.4f} -> step {records[-1]['step']} "
      f"{records[-1]['loss']:.4f}")
