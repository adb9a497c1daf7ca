"""Fixtures and hooks of the whole suite: the gpu marker's rules, clean process-wide state after each test, a
synthetic Cityscapes tree and one short training run. Plain helpers live in tests/helpers."""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.helpers.process import PYTHON, run
from tests.helpers.runs import tiny_overrides

GPU_NOTICE = ("{n} CUDA test(s) (marker gpu) deselected: CI machines have no GPU; on a GPU machine run "
              "`bash tests/run.sh -m gpu` (the GPU path is measured by bench/gpu_proof.sh)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; deselected unless -m selects it, and then it fails "
                                       "(never skips) where there is no GPU")


def pytest_collection_modifyitems(config, items):
    """The gpu tests are deselected, loudly, unless a -m expression names them (`-m gpu`): then a selected gpu test
    without CUDA fails (under CI a capability that cannot run fails; it never skips)."""
    if "gpu" in (config.getoption("markexpr") or ""):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.hook.pytest_deselected(items=gpu)
        config.stash[GPU_DESELECTED] = len(gpu)


def pytest_terminal_summary(terminalreporter, config):
    if config.stash.get(GPU_DESELECTED, 0):
        terminalreporter.write_line(GPU_NOTICE.format(n=config.stash[GPU_DESELECTED]), yellow=True)


GPU_DESELECTED = pytest.StashKey[int]()


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: a test that made an Accelerator in this process (evaluate, export,
    check) must not fix the precision or device of the next one, whatever order the tests run in."""
    yield
    if "accelerate.state" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


@pytest.fixture(autouse=True)
def signal_handlers_unchanged():
    """Code run in this process (cityseg_main(["train", ...]) installs the stop handlers) gives back the handlers
    it found: a test must not leave SIGINT/SIGTERM/SIGUSR1 rewired for the tests after it."""
    # not SIGCHLD: torch's DataLoader installs its worker-death handler once per process, on purpose
    watched = [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGQUIT,
               signal.SIGALRM, signal.SIGPIPE]
    before = {signum: signal.getsignal(signum) for signum in watched}
    yield
    changed = [signum.name for signum, handler in before.items() if signal.getsignal(signum) != handler]
    for signum, handler in before.items():  # the next test starts clean whatever this one left
        if handler is not None:
            signal.signal(signum, handler)
    assert not changed, f"signal handlers left changed by the test: {', '.join(changed)}"


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """16 train / 7 val images of 64x128 in the Cityscapes layout (7 val: uneven shards over 2 ranks)."""
    from cityseg.data.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, n_train=16, n_val=7, height=64, width=128, seed=0)
    return root


@pytest.fixture(scope="session")
def trained_run(synth_root, tmp_path_factory) -> Path:
    """One short single-process training run shared by the evaluation tests (its output_dir)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    result = run([PYTHON, "train.py", "--config", "configs/demo.yaml",
                  *tiny_overrides(synth_root, out, train__epochs=8, loss__name="dice+ce", optim__lr=0.005)])
    assert result.returncode == 0, result.stderr[-3000:]
    return out
