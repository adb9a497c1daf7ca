"""Every shell block of the user guides runs as pasted after the quick start; a block that needs a GPU, a cluster,
real data or the network says so on its fence (```bash cluster) and only then is left out."""
from __future__ import annotations

import collections
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cityseg.cli import build_parser
from cityseg.data.synthetic import write_synthetic
from tests.helpers.doc_blocks import (
    MARKERS,
    README,
    REPO,
    guide_blocks,
    guide_script,
    user_guides,
)
from tests.helpers.process import child_env

GUIDE_TIMEOUT_S = 600  # all blocks of one guide on a loaded 2-core machine; about 25 s on an idle one
SETUP_TIMEOUT_S = 300
REPO_FILES = ("configs", "launch", "slurm", "logs", "train.py", "pyproject.toml", "constraints.txt")


def test_every_fence_in_the_user_guides_names_its_language():
    """A shell block is recognised by its language alone, so a fence without one could hide a command."""
    unlabeled = [block.where for guide in user_guides() for block in guide_blocks(guide) if not block.language]
    assert not unlabeled, ("fenced blocks without a language (write ```bash for commands, ```text for output or "
                           "listings):\n" + "\n".join(unlabeled))


def test_only_shell_blocks_carry_markers_and_only_known_ones():
    problems = []
    for guide in user_guides():
        for block in guide_blocks(guide):
            unknown = [marker for marker in block.markers if marker not in MARKERS]
            if block.markers and not block.is_shell:
                problems.append(f"{block.where}: ```{block.language} is not run, so it takes no marker")
            elif unknown:
                problems.append(f"{block.where}: unknown marker(s) {', '.join(unknown)}; known: {', '.join(MARKERS)}")
    assert not problems, "\n".join(problems)


def quick_start_synth(repo: Path) -> None:
    """The data of the README's quick start (its `cityseg synth` line), written in-process at the same path."""
    line = next(line for line in README.read_text().splitlines() if line.startswith("cityseg synth "))
    args = build_parser().parse_args(shlex.split(line)[1:])
    write_synthetic(repo / args.out, n_train=args.train, n_val=args.val, height=args.height, width=args.width,
                    seed=args.seed)


def after_quick_start(root: Path, env: dict) -> Path:
    """A copy of the repository's files where the quick start has run: its data, and runs/demo trained 2 steps."""
    repo = root / "repo"
    repo.mkdir()
    for name in REPO_FILES:
        source = REPO / name
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, repo / name)
    quick_start_synth(repo)
    result = subprocess.run(["cityseg", "train", "--config", "configs/demo.yaml", "train.max_steps=2"], check=False,
                            cwd=repo, env=env, capture_output=True, text=True, timeout=SETUP_TIMEOUT_S)
    assert result.returncode == 0, f"the quick start's training failed:\n{(result.stdout + result.stderr)[-3000:]}"
    return repo


def failure_report(guide: Path, output: str, returncode: int) -> str:
    """The guide, the block's line, the command that failed and the tail of what the block printed."""
    block_line = output.rpartition("### block ")[2].split("\n", 1)[0] or "?"
    failed = output.rpartition("### failed ")[2].split("\n", 1)[0] if "### failed " in output else f"exit {returncode}"
    tail = output.rpartition(f"### block {block_line}\n")[2][-3000:]
    return (f"{guide.relative_to(REPO)}:{block_line}: a command of this block failed {failed}; it is stale, or "
            f"needs something the fence should name ({', '.join(MARKERS)}). Output of the block:\n{tail}")


@pytest.mark.slow
def test_every_shell_block_runs_as_pasted_after_the_quick_start(tmp_path):
    """Each guide in a fresh copy of the post-quick-start repository, its blocks in order in one bash session."""
    venv_bin = Path(sys.executable).parent  # what `source .venv/bin/activate` puts first on PATH
    env = child_env(PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    template = after_quick_start(tmp_path, env)
    ran, left_out, failures = [], 0, []
    skipped = collections.Counter()  # blocks left out per marker (a block may name two)
    for guide in user_guides():
        blocks = [block for block in guide_blocks(guide) if block.is_shell]
        runnable = [block for block in blocks if not block.markers]
        left_out += len(blocks) - len(runnable)
        for block in blocks:
            skipped.update(block.markers)
        if not runnable:
            continue
        workdir = tmp_path / guide.stem
        shutil.copytree(template, workdir, symlinks=True)
        started = time.monotonic()
        try:
            result = subprocess.run(["bash", "-c", guide_script(runnable)], check=False, cwd=workdir,
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    timeout=GUIDE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            failures.append(f"{guide.relative_to(REPO)}: its blocks did not finish within {GUIDE_TIMEOUT_S} s")
            continue
        if result.returncode != 0:
            failures.append(failure_report(guide, result.stdout, result.returncode))
        ran += [block.where for block in runnable]
        print(f"{guide.relative_to(REPO)}: {len(runnable)} block(s) in {time.monotonic() - started:.1f} s")
    print(f"ran {len(ran)} shell blocks: {', '.join(ran)}; left out {left_out}, by marker: {dict(skipped)}")
    assert not failures, "\n\n".join(failures)
    assert len(ran) >= 5, f"only {len(ran)} user-guide shell blocks ran: {ran}"
