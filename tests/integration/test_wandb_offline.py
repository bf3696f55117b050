"""logger=wandb: an offline run (no key, no network) holding the resolved config and every logged step."""

import json

from cli import metrics, omni_train
from wandb_log import read_records


def test_wandb_offline_run_holds_config_and_metrics(tmp_path):
    run_dir = tmp_path / "run"
    omni_train(["logger=wandb", "trainer.max_steps=3", "optim.warmup_steps=1", f"run_dir={run_dir}"])
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = read_records(files[0])

    config = {}  # set at init (the run record) and by later config updates
    for record in records:
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in updates})
    assert config["trainer"]["max_steps"] == 3
    assert config["model"]["flavor"] == "tiny"
    assert config["run_dir"] == str(run_dir)  # resolved, not "${...}"

    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = record.history.item
            history[record.history.step.num] = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}
    logged = metrics(run_dir)
    assert sorted(history) == sorted(logged) == [1, 2, 3]
    for step, values in logged.items():
        assert history[step]["loss"] == values["loss"]
