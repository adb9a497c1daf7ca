"""The suite's own rules: the CUDA tests are deselected loudly by default and, selected without a GPU, fail."""
import pytest

from tests.helpers.process import PYTHON, child_env, run


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
