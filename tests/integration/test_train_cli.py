"""The real CLI on the tiny recipe: learning, resume, stage hand-off and artifacts."""


from cli import metrics, omni_train


def test_tiny_recipe_loss_falls_within_100_steps(tiny_recipe_run):
    root, records = tiny_recipe_run  # tests/conftest.py: recipe=tiny/text_pretrain at ROOT/text_pretrain
    run_dir = root / "text_pretrain"
    losses = [r["loss"] for _, r in sorted(records.items())]
    assert len(losses) == 100  # tiny recipes log every step
    first, last = losses[0], sum(losses[-10:]) / 10
    assert first > 6.5  # ~log(1024) from a random init
    assert last < first - 2.0, f"loss fell only from {first:.3f} to {last:.3f}"
    png = (run_dir / "loss_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    record = records[100]
    for key in ("lr", "grad_norm", "tokens_per_s", "peak_memory_gib", "moe_load_imbalance_max"):
        assert record[key] > 0, key
    assert len(record["moe_load_imbalance"]) == 4  # one per MoE layer of the tiny model
    assert (run_dir / "checkpoints" / "step_00000100" / "omni_train.json").exists()


def test_resume_after_stop_at_step_is_bitwise_identical(text_run_6_steps, tmp_path):
    """Stopped after step 3 and rerun: steps 4-6 equal the uninterrupted run's (tests/conftest.py:
    TEXT_6_STEPS, the run the parity tests compare against)."""
    _, straight = text_run_6_steps
    common = ["trainer.max_steps=6", "checkpoint.save_every=100"]
    stopped = omni_train([*common, f"run_dir={tmp_path / 'resumed'}", "trainer.stop_at_step=3"])
    assert "stopped after step 3" in stopped.stdout
    assert sorted(metrics(tmp_path / "resumed")) == [1, 2, 3]
    again = omni_train([*common, f"run_dir={tmp_path / 'resumed'}"])
    assert "resumed from" in again.stdout
    resumed = metrics(tmp_path / "resumed")
    assert sorted(resumed) == sorted(straight) == list(range(1, 7))
    for step in range(4, 7):
        for key in ("loss", "grad_norm", "lr"):
            assert resumed[step][key] == straight[step][key], (step, key)


def test_stage_handoff_by_name(tiny_recipe_run):
    """A stage started with init_from=stage:text_pretrain begins where that stage ended (its 100 steps,
    the run of test_tiny_recipe_loss_falls_within_100_steps)."""
    root, trained = tiny_recipe_run
    fresh_start, last = trained[1]["loss"], trained[max(trained)]["loss"]
    proc = omni_train(["trainer.max_steps=3", "optim.warmup_steps=1", f"run_dir={root / 'continued'}",
                       "init_from=stage:text_pretrain"])
    assert "initialised model weights from" in proc.stdout
    continued = metrics(root / "continued")
    # Starts where the first stage ended, far below a fresh model's loss.
    assert abs(continued[1]["loss"] - last) < 0.3
    assert continued[1]["loss"] < fresh_start - 1.0


def test_missing_handoff_source_fails_with_the_key(tmp_path):
    proc = omni_train(["trainer.max_steps=3", "optim.warmup_steps=1", f"run_dir={tmp_path / 'b'}",
                       "init_from=stage:nope"], check=False)
    assert proc.returncode != 0
    assert "init_from=stage:nope" in proc.stderr


def test_dry_run_of_the_30b_layout_allocates_nothing(tmp_path):
    proc = omni_train(["model=qwen3_omni_30b_a3b", "parallel.tp=2", "parallel.sequence_parallel=true",
                       "parallel.ep=8", "parallel.pp=4", "dry_run=true", f"run_dir={tmp_path / 'r'}"])
    out = proc.stdout
    assert "30,532,646,912 parameters" in out and "3,353,556,992" in out  # total, active
    assert "built on the meta device: 30,532,646,912 parameters (matches" in out
    assert out.count("pipeline stage") == 4
    assert "layers.*.mlp.experts.local_experts.{i}.linear_fc1.weight (768, 2048) x16" in out  # 128/8 experts, tp 2
    assert "output_layer.weight (76032, 2048)" in out  # vocab 152064 / tp 2, last stage only
    assert not (tmp_path / "r").exists()
