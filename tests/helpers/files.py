"""Files a test writes: a copy of a data tree to break, a pickle that would run code when loaded."""
from __future__ import annotations

import shutil
from pathlib import Path


def copy_tree(src: Path, tmp_path: Path) -> Path:
    """A copy of the tree at src under tmp_path/cs, this test's own to damage."""
    root = tmp_path / "cs"
    shutil.copytree(src, root)
    return root


class CodeOnLoad:
    """A pickle that runs a command when loaded (what a hostile .pth, optimizer.bin or random_states file would
    carry): loading it touches `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)
