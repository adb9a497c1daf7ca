"""The official Cityscapes evaluator, in its own venv (tests/helpers/evaluation.py), as a fixture that runs it."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.evaluation import COMMAND, create_venv


@pytest.fixture(scope="session")
def official_evaluator():
    """run(dataset_root, results_dir, export_dir) → the official JSON export (classScores, averageScoreClasses...)."""
    create_venv()

    def run(dataset_root: Path, results_dir: Path, export_dir: Path) -> dict:
        export_dir.mkdir(parents=True, exist_ok=True)
        env = {"PATH": os.environ.get("PATH", ""), "CITYSCAPES_DATASET": str(dataset_root),
               "CITYSCAPES_RESULTS": str(results_dir), "CITYSCAPES_EXPORT_DIR": str(export_dir)}
        result = subprocess.run([str(COMMAND)], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return json.loads((export_dir / "resultPixelLevelSemanticLabeling.json").read_text())

    return run
