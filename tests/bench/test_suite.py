"""The suite's own rules: the CUDA tests are deselected loudly by default and, selected without a GPU, fail; the quick
tier reaches every folder; tests/run.sh's streams run the whole suite and fail when one of them fails."""
import ast
import re

import pytest

from tests.helpers.process import PYTHON, REPO, child_env, run


@pytest.mark.slow
def test_gpu_tests_are_deselected_with_a_notice_and_fail_without_cuda_when_selected():
    env = child_env(CUDA_VISIBLE_DEVICES="")  # whatever machine runs this: the child sees no GPU
    default = run([PYTHON, "-m", "pytest", "tests/bench/test_cuda.py", "-p", "no:randomly"], env=env, timeout=300)
    assert default.returncode == 5, default.stdout[-3000:]  # pytest: no test ran (all deselected)
    assert "CUDA test(s) (marker gpu) deselected: CI machines have no GPU; on a GPU machine run " \
           "`bash tests/run.sh -m gpu`" in default.stdout, default.stdout[-3000:]
    selected = run([PYTHON, "-m", "pytest", "tests/bench/test_cuda.py", "-m", "gpu", "-p", "no:randomly"],
                   env=env, timeout=300)
    assert selected.returncode == 1, selected.stdout[-3000:]
    assert "skipped" not in selected.stdout and "marker gpu selected on a machine without a CUDA GPU" in \
        selected.stdout, selected.stdout[-3000:]


def marked(node, name: str) -> bool:
    return any(name in ast.unparse(decorator) for decorator in node.decorator_list)


def test_every_folder_keeps_quick_tests():
    """The quick tier (`bash tests/run.sh --quick`, -m "not slow") runs unit tests of every folder of tests/."""
    without = []
    for folder in sorted(p for p in (REPO / "tests").iterdir() if list(p.glob("test_*.py"))):
        quick = 0
        for module in folder.glob("test_*.py"):
            source = module.read_text()
            if re.search(r"^pytestmark = pytest\.mark\.(slow|gpu)", source, re.MULTILINE):
                continue
            quick += sum(1 for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)
                         and node.name.startswith("test_") and not marked(node, "slow") and not marked(node, "gpu"))
        if not quick:
            without.append(folder.name)
    assert not without, f"folders without a test outside the slow marker: {without}"


@pytest.mark.slow
def test_run_sh_streams_together_collect_the_suite_and_a_failed_stream_fails_the_run():
    """tests/run.sh runs the whole suite as pytest processes side by side: together they collect what one process
    collects, each once, and the exit status of any of them is the run's."""
    whole = run([PYTHON, "-m", "pytest", "--co", "-q", "tests"], timeout=600)
    split = run(["bash", "tests/run.sh", "--co", "-q"], timeout=600)
    assert whole.returncode == 0 and split.returncode == 0, split.stdout[-3000:] + split.stderr[-3000:]
    tests = sorted(line for line in split.stdout.splitlines() if line.startswith("tests/") and "::" in line)
    assert tests == sorted(line for line in whole.stdout.splitlines() if line.startswith("tests/") and "::" in line)
    assert len(set(tests)) == len(tests) and "tests/cluster/" in split.stdout and "tests/faults/" in split.stdout
    # a stream that fails (here: tests/cluster + tests/bench, every test of it deselected, runs nothing: exit 5)
    # fails the run
    failed = run(["bash", "tests/run.sh", "--co", "-q", "--deselect=tests/cluster", "--deselect=tests/bench"],
                 timeout=600)
    assert failed.returncode == 5, failed.stdout[-3000:]
    assert "tests/cluster tests/bench: exit 5" in failed.stdout.splitlines()[-1], failed.stdout[-3000:]
