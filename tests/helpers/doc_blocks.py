"""The fenced blocks of the user guides: their language, their markers, and one bash script per guide to run them."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
CONTRIBUTOR_PAGES = ("development.md", "architecture.md")
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
# A shell block runs unless its fence names one of these after the language (```bash cluster): what it needs.
MARKERS = {
    "gpu": "CUDA devices (bf16 / several GPUs / a recipe's step at its crop size)",
    "cluster": "SLURM: sbatch, srun, squeue, scancel, or launch/submit.py without --dry-run",
    "real-data": "the Cityscapes dataset itself (data.root=/data/cityscapes, the official evaluator's ground truth)",
    "network": "the internet: pip install, the model hub, W&B online",
    "server": "a program that serves until it is stopped (a viewer)",
    "long": "minutes of CPU even on tiny data (a benchmark that measures)",
}
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^`\n]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.DOTALL | re.MULTILINE)


@dataclass(frozen=True)
class Block:
    guide: Path
    line: int  # the opening fence's line, 1-based
    language: str  # "" when the fence names none
    markers: tuple[str, ...]
    body: str

    @property
    def where(self) -> str:
        return f"{self.guide.relative_to(REPO)}:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.language in SHELL_LANGUAGES

    def commands(self) -> str:
        """What a user pastes: the block itself; of a console block only the `$ ` lines, prompt dropped."""
        if self.language != "console":
            return self.body
        return "".join(line.split("$ ", 1)[1] + "\n" for line in self.body.splitlines() if line.lstrip().startswith("$ "))


def user_guides() -> list[Path]:
    """The README and docs/*.md, contributor pages left out."""
    return [README, *(doc for doc in sorted((REPO / "docs").glob("*.md")) if doc.name not in CONTRIBUTOR_PAGES)]


def fenced_blocks(guide: Path) -> list[Block]:
    text = guide.read_text()
    blocks = []
    for found in FENCE.finditer(text):
        language, *markers = found.group("info").split() or [""]
        indent = len(found.group("indent"))
        body = "".join(line[indent:] + "\n" for line in found.group("body").splitlines())
        blocks.append(Block(guide, text.count("\n", 0, found.start()) + 1, language, tuple(markers), body))
    return blocks


def quick_start_end(readme_text: str) -> int:
    """The line where the README's quick start (its first `## ` section) ends: blocks after it are guide blocks."""
    headings = [number for number, line in enumerate(readme_text.splitlines(), 1) if line.startswith("## ")]
    assert len(headings) >= 2, "README.md: the quick start must be the first of several `## ` sections"
    return headings[1]


def guide_blocks(guide: Path) -> list[Block]:
    """The guide's fenced blocks a user meets after the quick start (in the README: those after its section)."""
    blocks = fenced_blocks(guide)
    if guide == README:
        start = quick_start_end(guide.read_text())
        blocks = [block for block in blocks if block.line > start]
    return blocks


def guide_script(blocks: list[Block]) -> str:
    """One bash session for a guide's runnable blocks, in order: it stops at the first failing command and says
    which block and which command it was (a `### block <line>` line before each block, `### failed: ...` after)."""
    lines = ["set -eE -o pipefail",
             "trap 'echo \"### failed (exit $?): $BASH_COMMAND\" >&2' ERR"]
    for block in blocks:
        lines += [f"echo '### block {block.line}'", block.commands()]
    return "\n".join(lines) + "\n"
