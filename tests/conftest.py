"""Shared test helpers: real subprocesses of the real CLI, a synthetic Cityscapes tree, free ports."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


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


def child_env(**extra: str) -> dict:
    """Environment for child processes: this checkout first on the path, CPU gloo, no W&B network, 1 thread."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), ACCELERATE_USE_CPU="1", WANDB_MODE="offline", WANDB_SILENT="true",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    env.pop("WANDB_API_KEY", None)
    env.update(extra)
    return env


def run(args: list[str], timeout: float = 600, env: dict | None = None, cwd: Path = REPO,
        **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env or child_env(), capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def cityseg(*args, **kwargs) -> subprocess.CompletedProcess:
    """`python -m cityseg ...` in a child process."""
    return run([PYTHON, "-m", "cityseg", *args], **kwargs)


def free_port() -> int:
    """A port free now, for a command that must be told one in advance (two launchers meeting on it). It can be
    taken before the command binds it: where one launcher binds alone, pass port 0 instead (see launch_cmd)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_cmd(num_processes: int, *target: str, port: int = 0) -> list[str]:
    """`accelerate launch` of N CPU processes over gloo (needs ACCELERATE_USE_CPU=1, set by child_env). Port 0: the
    launcher picks a free port itself, just before it binds it (not seconds earlier, in this process)."""
    return [PYTHON, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port), *target]


def tiny_overrides(root: Path, output_dir: Path, **extra) -> list[str]:
    """A run small enough for 2 CPU cores: 64x128 images, batch 4, no loader workers, W&B off."""
    values = {"data.root": root, "output_dir": output_dir, "data.image_size": "[64,128]", "data.batch_size": 4,
              "data.num_workers": 0, "train.epochs": 1, "train.log_every": 1, "tracking.wandb.mode": "disabled",
              "optim.warmup_steps": 0}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


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


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rank_reports(stdout: str) -> list[dict]:
    """The {"rank": ...} objects that processes sharing one stdout printed: two ranks' lines may interleave
    (one rank's newline after the other's object), so objects are decoded where they start, not per line."""
    decoder, found, start = json.JSONDecoder(), [], stdout.find('{"rank"')
    while start != -1:
        report, end = decoder.raw_decode(stdout, start)
        found.append(report)
        start = stdout.find('{"rank"', end)
    return found


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
