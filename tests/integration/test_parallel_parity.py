"""2-process runs (gloo, CPU) give the single-process run's per-step losses on the same global batch."""

import pytest

from cli import metrics, torchrun
from cli import TEXT_6_STEPS as STEPS


@pytest.fixture
def single_process(text_run_6_steps):
    """The session's one-process run of STEPS (tests/conftest.py), by step."""
    return text_run_6_steps[1]


@pytest.mark.parametrize("layout", [[], ["parallel.ep=2"]], ids=["dp2", "ep2"])
def test_two_processes_match_single_process(tmp_path, single_process, layout, request):
    if layout:
        run_dir = tmp_path / "run"
        torchrun(2, [*STEPS, f"run_dir={run_dir}", *layout])
        parallel = metrics(run_dir)
    else:  # plain data parallel: the session's run, which the launcher test compares with too
        parallel = request.getfixturevalue("text_torchrun_6_steps")[1]
    assert sorted(parallel) == sorted(single_process) == list(range(1, 7))
    for step, reference in single_process.items():
        assert abs(parallel[step]["loss"] - reference["loss"]) <= 1e-5, step
    # Training moved: the comparison is not between two untrained models.
    assert single_process[6]["loss"] < single_process[1]["loss"] - 0.5


@pytest.mark.parametrize("layout", [["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.cp=2"],
                                    ["parallel.pp=2"]], ids=["tp2_sp", "cp2", "pp2"])
def test_model_parallel_layouts_match_single_process(tmp_path, single_process, layout):
    run_dir = tmp_path / "run"
    torchrun(2, [*STEPS, f"run_dir={run_dir}", *layout])
    parallel = metrics(run_dir)
    for step, reference in single_process.items():
        assert abs(parallel[step]["loss"] - reference["loss"]) <= 1e-5, step
        assert abs(parallel[step]["grad_norm"] - reference["grad_norm"]) <= 1e-4 * reference["grad_norm"], step
