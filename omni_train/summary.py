"""One picture of a whole pipeline run: every stage's metrics.jsonl on one step axis.

``write_summary`` draws <out> (a PNG page) and writes the numbers behind it beside it (<out>.json). The x
axis is the pipeline's step: stage k's steps are offset by the sum of the earlier stages' last steps, and
stage boundaries are dashed lines under the stage names. The panels take their keys by pattern
(``PANELS``), so a part a stage starts to report shows without a change here:

- loss: each stage's optimised ``loss`` (its meaning differs by stage: LM NLL, NLL + KL, GSPO's surrogate);
- loss by part: ``loss_*`` (the Thinker's loss_text/audio/image/video, distillation's loss_nll, the
  Talker's loss_codec0/loss_residual, DPO's loss_dpo/loss_sft);
- reward: GSPO's mean ``reward`` and each reward function's ``reward/<name>_mean``, DPO's
  ``rewards_accuracy`` and ``rewards_margin``;
- KL: ``kl_*`` (kl_top_k off-policy, kl_teacher on-policy, GSPO's kl_reference).

``name_count`` keys (loops/report.py logs one beside each mean) are never drawn. A step logged twice (a
resumed run recomputes the steps after its last checkpoint) counts once, its last record; NaN and inf
are skipped; a stage without metrics.jsonl is named in the title as having none.

``log_summary_to_wandb`` logs the page and a table of the numbers as a "summary" run of the pipeline's
W&B group (``pipeline_group``, the group its stages log to).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from omni_train.config import LoggerConfig
from omni_train.metrics import _stable_run_id, read_metrics

# (panel title, full-match key patterns), top to bottom
PANELS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("loss", (r"loss",)),
    ("loss by part", (r"loss_.+",)),
    ("reward", (r"reward", r"reward/.+_mean", r"rewards_(accuracy|margin)")),
    ("KL", (r"kl_.+",)),
)
FIGSIZE, DPI = (12.0, 11.0), 100  # the page: 1200 x 1100 pixels

Series = List[Tuple[int, float]]  # (stage step, value), by step


@dataclass
class StageMetrics:
    name: str
    run_dir: Path
    offset: int  # pipeline step of this stage's step 0
    steps: int  # its last logged step (0 when missing)
    logged: int  # distinct steps logged
    series: Dict[str, Series]  # plotted keys only
    missing: bool = False


def panel_of(key: str) -> Optional[int]:
    """Index into PANELS of the panel that draws ``key``, or None."""
    if key.endswith("_count"):
        return None
    for i, (_, patterns) in enumerate(PANELS):
        if any(re.fullmatch(p, key) for p in patterns):
            return i
    return None


def _finite(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_stage(name: str, run_dir: Path, offset: int) -> StageMetrics:
    """One stage's plotted keys from <run_dir>/metrics.jsonl, a step's last record winning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return StageMetrics(name, Path(run_dir), offset, 0, 0, {}, missing=True)
    by_step = {r["step"]: r for r in read_metrics(path) if isinstance(r, dict) and isinstance(r.get("step"), int)}
    series: Dict[str, Series] = {}
    for step in sorted(by_step):
        for key, value in by_step[step].items():
            value = _finite(value)
            if value is not None and panel_of(key) is not None:
                series.setdefault(key, []).append((step, value))
    return StageMetrics(name, Path(run_dir), offset, max(by_step, default=0), len(by_step), series)


def read_stages(stages: Sequence[Tuple[str, Path]]) -> List[StageMetrics]:
    out, offset = [], 0
    for name, run_dir in stages:
        stage = read_stage(name, run_dir, offset)
        out.append(stage)
        offset += stage.steps
    return out


def summarize(run_dir: Path, stages: Sequence[StageMetrics]) -> Dict:
    """summary.json: per stage its steps and the first / last finite value of each plotted key."""
    rows = []
    for s in stages:
        values = {key: {"first": points[0][1], "last": points[-1][1], "first_step": points[0][0],
                        "last_step": points[-1][0]} for key, points in s.series.items()}
        rows.append({"name": s.name, "run_dir": str(s.run_dir), "missing": s.missing, "offset": s.offset,
                     "steps": s.steps, "logged_steps": s.logged, "values": values})
    return {"run_dir": str(run_dir), "total_steps": sum(s.steps for s in stages), "stages": rows}


def _colors(stages: Sequence[StageMetrics]) -> Dict[str, str]:
    """One color per key across the page (loss_text is the same color in every stage)."""
    keys = sorted({key for s in stages for key in s.series}, key=lambda k: (panel_of(k), k))
    return {key: f"C{i % 10}" for i, key in enumerate(keys)}


def _short(key: str, width: int = 36) -> str:
    """A legend label: reward function names can be whole import paths."""
    return key if len(key) <= width else "..." + key[-(width - 3):]


def plot(run_dir: Path, stages: Sequence[StageMetrics], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _colors(stages)
    present = [s for s in stages if not s.missing]  # a missing stage has no steps: named in the title
    total = sum(s.steps for s in stages)
    fig, axes = plt.subplots(len(PANELS), 1, figsize=FIGSIZE, sharex=True)
    for i, (ax, (title, _)) in enumerate(zip(axes, PANELS)):
        drawn = set()
        for k, s in enumerate(stages):
            for key, points in s.series.items():
                if panel_of(key) != i:
                    continue
                xs = [s.offset + step for step, _ in points]
                color = f"C{k % 10}" if i == 0 else colors[key]  # the loss: by stage; parts: by key
                ax.plot(xs, [v for _, v in points], color=color, marker="o" if len(points) == 1 else None,
                        markersize=4, linewidth=1.2, label=None if i == 0 or key in drawn else _short(key))
                drawn.add(key)
        for s in present[1:]:
            ax.axvline(s.offset + 0.5, color="0.5", linewidth=0.8, linestyle="--")
        if not drawn:
            ax.text(0.5, 0.5, f"no {title} keys logged", transform=ax.transAxes, ha="center", va="center",
                    color="0.5")
        elif i > 0:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("pipeline step")
    axes[0].set_xlim(0, max(total, 1) + 1)
    top = axes[0].secondary_xaxis("top")
    top.set_xticks([s.offset + s.steps / 2 + 0.5 for s in present], labels=[s.name for s in present],
                   rotation=30, ha="left", fontsize="small")
    top.tick_params(length=0)
    missing = [s.name for s in stages if s.missing]
    fig.suptitle(f"{Path(run_dir).name}: {len(stages)} stages, {total} steps"
                 + (f"; no metrics from {', '.join(missing)}" if missing else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def write_summary(run_dir: Path, stages: List[Tuple[str, Path]], out: Path) -> Path:
    """Draw ``stages`` ((name, stage run dir) in pipeline order) on one page at ``out`` (PNG) and write the
    numbers behind it to ``out.with_suffix(".json")``; returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    read = read_stages(stages)
    plot(Path(run_dir), read, out)
    out.with_suffix(".json").write_text(json.dumps(summarize(Path(run_dir), read), indent=1) + "\n")
    return out


def pipeline_group(run_dir: Path) -> str:
    """The W&B group of a pipeline's runs: the run directory's name and a hash of its full path (two
    pipelines in runs/a/x and runs/b/x stay apart; rerunning one keeps its group)."""
    path = Path(run_dir).resolve()
    return f"{path.name[:100]}-{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"


def log_summary_to_wandb(cfg: LoggerConfig, run_dir: Path, png: Path, summary: Path) -> Optional[str]:
    """Log the page (wandb.Image) and summary.json as a table to a W&B run of job type "summary" in the
    pipeline's group (``cfg.group``, else ``pipeline_group(run_dir)``), in <run_dir>/wandb. Does nothing
    unless ``cfg.name`` is "wandb"; returns the group."""
    if cfg.name != "wandb":
        return None
    import wandb  # imported here: logger=none runs never need it

    run_dir = Path(run_dir)
    data = json.loads(Path(summary).read_text())
    group = cfg.group or pipeline_group(run_dir)
    rows = [[s["name"], key, v["first_step"], v["first"], v["last_step"], v["last"]]
            for s in data["stages"] for key, v in s["values"].items()]
    run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, name=f"{run_dir.name}-summary",
                     dir=str(run_dir), group=group, job_type="summary", id=_stable_run_id(run_dir / "summary"),
                     resume="allow", config={"run_dir": str(run_dir),
                                             "stages": [s["name"] for s in data["stages"]]})
    try:
        table = wandb.Table(columns=["stage", "key", "first_step", "first", "last_step", "last"], data=rows)
        run.log({"pipeline_summary": wandb.Image(str(png)), "pipeline_values": table})
        for s in data["stages"]:
            run.summary[f"{s['name']}/steps"] = s["steps"]
    finally:
        run.finish()
    return group
