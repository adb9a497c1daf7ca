"""The README and docs/ stay true: links resolve, the quick start runs, every config key and module is documented."""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from cityseg.cli import build_parser
from cityseg.config.load import load_config
from cityseg.config.schema import Config
from tests.helpers.doc_blocks import user_guides
from tests.helpers.process import child_env

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
CONFIG_DOC = REPO / "docs" / "configuration.md"
ARCHITECTURE_DOC = REPO / "docs" / "architecture.md"
DEVELOPMENT_DOC = REPO / "docs" / "development.md"
COMMAND_TIMEOUT_S = 600  # one quick-start command on a loaded 2-core machine; normally a few seconds


def doc_files() -> list[Path]:
    return [README, *sorted((REPO / "docs").glob("*.md"))]


def without_code(text: str) -> str:
    """Markdown with fenced blocks and inline code removed: links are only links outside code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def heading_anchors(markdown: str) -> set[str]:
    """The #anchors GitHub gives the headings of a markdown file (lowercase, punctuation dropped, spaces → -)."""
    anchors, seen = set(), {}
    for line in re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M).splitlines():
        found = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not found:
            continue
        slug = re.sub(r"[^\w\- ]", "", found.group(1).lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


# ---- links -------------------------------------------------------------------------------------------------------

def test_every_relative_link_resolves():
    broken = []
    for doc in doc_files():
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", without_code(doc.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (doc.parent / path_part).resolve() if path_part else doc
            where = f"{doc.relative_to(REPO)}: link ({target})"
            if not resolved.exists():
                broken.append(f"{where}: {resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved} "
                              "does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved.read_text()):
                broken.append(f"{where}: no heading with anchor #{anchor} in {resolved.relative_to(REPO)}")
    assert not broken, "broken links (fix the link or the file/heading it points to):\n" + "\n".join(broken)


def links_of(doc: Path) -> set[Path]:
    return {(doc.parent / target.partition("#")[0]).resolve()
            for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", without_code(doc.read_text()))}


def test_readme_links_every_guide():
    """User guides from the README's Documentation table; contributor pages (architecture) from development.md,
    which the README links."""
    linked = links_of(README) | links_of(DEVELOPMENT_DOC)
    unlinked = [str(guide.relative_to(REPO)) for guide in sorted((REPO / "docs").glob("*.md"))
                if guide.resolve() not in linked]
    assert DEVELOPMENT_DOC.resolve() in links_of(README), "README.md does not link docs/development.md"
    assert not unlinked, ("neither README.md nor docs/development.md links these guides; add a row to the README's "
                          "Documentation table (a user guide) or a link in docs/development.md: " + ", ".join(unlinked))


CONTRIBUTOR_SPEAK = ("add its row", "add a row", "floor", "how this is tested", "tests/", "test_", "not yet run",
                     "goal", "tests.", "tests build", "fake `wandb", "namespace", "as root", "have not run on a gpu")


def test_user_guides_speak_to_users():
    """What a contributor needs (tests, the module map, rows to add) is in docs/development.md and
    docs/architecture.md; the README and the user guides say what a user can do."""
    found = []
    for doc in user_guides():
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            found += [f"{doc.relative_to(REPO)}:{number}: '{phrase}' in: {line.strip()}"
                      for phrase in CONTRIBUTOR_SPEAK if phrase in line.lower()]
    allowed = {"README.md"}  # the README names `bash tests/run.sh`, the one command a user runs the tests with
    found = [f for f in found if not (f.split(":")[0] in allowed and "tests/run.sh" in f)]
    assert not found, "contributor material in a user guide (move it to docs/development.md):\n" + "\n".join(found)


def test_no_troubleshooting_entry_twice():
    """A bold-headed bullet (`* **Symptom**: ...`) appears once per guide: two answers to one symptom disagree."""
    repeated = []
    for doc in user_guides():
        heads = re.findall(r"^\s*[*-] \*\*(.+?)\*\*", doc.read_text(), flags=re.M)
        repeated += [f"{doc.relative_to(REPO)}: '{head}'" for head in sorted(set(heads)) if heads.count(head) > 1]
    assert not repeated, "entries listed twice (merge them into one):\n" + "\n".join(repeated)


def test_configuration_doc_names_every_shipped_config():
    paragraph = re.search(r"^Shipped configs:(.*?)\n\n", CONFIG_DOC.read_text(), flags=re.S | re.M)
    assert paragraph, "docs/configuration.md: no 'Shipped configs:' paragraph"
    missing = [config.name for config in sorted((REPO / "configs").glob("*.yaml"))
               if f"configs/{config.name}" not in paragraph.group(1)]
    assert not missing, f"docs/configuration.md 'Shipped configs' does not name: {', '.join(missing)}"


def test_evaluation_doc_names_the_runs_own_normalization_for_api_input():
    """A run records the encoder's mean / std (0.5 / 0.5 for the demo's tf_ MobileNetV3), not always ImageNet's:
    float input to the API must be normalized with what the run's config.yaml records."""
    from cityseg.data.normalization import resolve_normalization

    demo = load_config(REPO / "configs" / "demo.yaml")
    resolve_normalization(demo.data, demo.model)
    assert demo.data.mean != [0.485, 0.456, 0.406]  # the case the sentence must cover
    text = " ".join((REPO / "docs" / "evaluation.md").read_text().split())
    sentence = re.search(r"or float `\(B, 3, H, W\)` already normalized as the training data is.*?One image", text)
    assert sentence and "`data.mean` / `data.std`" in sentence.group(0) and "config.yaml" in sentence.group(0), (
        "docs/evaluation.md: float API input must be normalized with the run's data.mean / data.std "
        f"(config.yaml), found: {sentence.group(0) if sentence else 'no such sentence'}")


# ---- the configuration reference ---------------------------------------------------------------------------------

def config_keys(cls=Config, prefix: str = "") -> dict[str, tuple[object, object]]:
    """Every dotted leaf key of the config dataclasses → (type hint, default)."""
    keys = {}
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            keys.update(config_keys(hint, f"{prefix}{field.name}."))
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        keys[prefix + field.name] = (hint, default)
    return keys


def render_type(hint) -> str:
    """How the type column spells a type hint: int, list[int], `a / b` for a choice, `X or null` for Optional."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union and type(None) in args:
        return f"{render_type(next(a for a in args if a is not type(None)))} or null"
    if origin is typing.Literal:
        return " / ".join(render_value(a) for a in args)  # as YAML spells them: false / true / default
    if origin is list:
        return f"list[{render_type(args[0])}]"
    return getattr(hint, "__name__", str(hint))


def render_value(value) -> str:
    """How the default column spells a default, as in YAML: null, true, [256, 512], 0.001, auto."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(render_value(item) for item in value) + "]"
    if isinstance(value, str):
        return value if value else '""'
    return repr(value)


def documented_rows(markdown: str) -> list[tuple[int, str, str, str]]:
    """(line number, key, type, default) of each table row whose first cell is one backquoted dotted key."""
    rows = []
    for number, line in enumerate(markdown.splitlines(), 1):
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) >= 3 and re.fullmatch(r"`[a-z_][a-z0-9_.]*`", cells[0]):
            rows.append((number, cells[0].strip("`"), cells[1].replace("`", ""), cells[2].replace("`", "")))
    return rows


def test_configuration_doc_lists_every_key_once_with_its_type_and_default():
    doc = CONFIG_DOC.relative_to(REPO)
    keys = config_keys()
    rows = documented_rows(CONFIG_DOC.read_text())
    problems = []
    seen = {}
    for number, key, type_text, default_text in rows:
        if key in seen:
            problems.append(f"{doc}:{number}: `{key}` is documented twice (also line {seen[key]}): keep one row")
            continue
        seen[key] = number
        if key not in keys:
            problems.append(f"{doc}:{number}: `{key}` is not a key of cityseg/config/schema.py: remove the row, or fix "
                            "the name")
            continue
        hint, default = keys[key]
        if type_text != render_type(hint):
            problems.append(f"{doc}:{number}: type of `{key}` is '{type_text}', config.py says "
                            f"'{render_type(hint)}': write {render_type(hint)} in the type column")
        if default_text != render_value(default):
            problems.append(f"{doc}:{number}: default of `{key}` is '{default_text}', config.py says "
                            f"'{render_value(default)}': write `{render_value(default)}` in the default column")
    for key, (hint, default) in keys.items():
        if key not in seen:
            problems.append(f"{doc}: `{key}` (cityseg/config/schema.py) is not documented: add this row to the table of "
                            f"its section:\n    | `{key}` | {render_type(hint)} | `{render_value(default)}` | "
                            "<what it does> |")
    assert not problems, "docs/configuration.md and cityseg/config/schema.py disagree:\n" + "\n".join(problems)


# ---- the README's commands ---------------------------------------------------------------------------------------

def bash_commands(markdown: str) -> list[str]:
    """Commands of the ```bash blocks in a markdown text: comments dropped, backslash continuations joined."""
    commands = []
    for block in re.findall(r"^```bash[^\n]*\n(.*?)^```", markdown, flags=re.S | re.M):
        for command in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#\s.*$", "", command).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def quick_start_commands() -> list[str]:
    """The bash commands of the README's first `## ` section."""
    sections = re.split(r"^## ", README.read_text(), flags=re.M)
    assert len(sections) > 1, "README.md has no `## ` section: the quick start must be the first one"
    commands = bash_commands(sections[1])
    assert commands, f"README.md: the first section ({sections[1].splitlines()[0]!r}) has no ```bash block"
    return commands


def run_for_real(command: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """Run one README command as a user would type it (split as the shell does, no shell in between); a short
    train run if it is `cityseg train`."""
    argv = shlex.split(command)
    if argv[:2] == ["cityseg", "train"]:
        argv.append("train.max_steps=2")  # the quick start's full run takes minutes; two steps prove it starts
    try:
        return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"README quick start: `{command}` did not finish within {COMMAND_TIMEOUT_S} s")


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path):
    """Each quick-start command, in order, in a fresh directory with the repository's configs/ (the demo data)."""
    (tmp_path / "configs").symlink_to(REPO / "configs")
    venv_bin = Path(sys.executable).parent  # what `source .venv/bin/activate` puts first on PATH
    env = child_env(PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}")
    ran = []
    for command in quick_start_commands():
        argv = shlex.split(command)
        if argv[0] == "bash":  # launch/venv.sh: installing again would take minutes; check it is a valid script
            script = REPO / argv[1]
            assert script.is_file(), f"README quick start: `{command}`: {argv[1]} does not exist"
            result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
        elif argv[0] == "source":  # what it does (venv bin first on PATH) is what env above does
            target = REPO / argv[1]
            if Path(sys.prefix).resolve() != target.parent.parent.resolve():  # tests run from another environment
                assert target.parent.parent.name in (REPO / "launch" / "venv.sh").read_text(), (
                    f"README quick start: `{command}`: launch/venv.sh does not create {target.parent.parent.name}")
                continue
            assert target.is_file(), f"README quick start: `{command}`: {target} does not exist (run launch/venv.sh)"
            assert (target.parent / "cityseg").is_file(), f"README quick start: no cityseg in {target.parent}"
            continue
        elif argv[0] in ("cityseg", "python"):
            result = run_for_real(command, tmp_path, env)
        else:
            pytest.fail(f"README quick start: `{command}`: tests/test_docs.py does not know how to run a "
                        f"`{argv[0]}` command; add a rule to test_quick_start_runs_as_written")
        assert result.returncode == 0, (f"README quick start: `{command}` exited {result.returncode}:\n"
                                        f"{(result.stdout + result.stderr)[-3000:]}")
        ran.append(argv[:2])
    assert ["cityseg", "train"] in ran, "README quick start: no `cityseg train` command"
    # What the quick start promises to leave behind.
    assert (tmp_path / "runs" / "demo" / "model.safetensors").is_file(), "quick start: no runs/demo/model.safetensors"
    if ["cityseg", "predict"] in ran:
        written = list((tmp_path / "runs" / "demo" / "predictions" / "labelIds").rglob("*.png"))
        assert written, "quick start: predict wrote no runs/demo/predictions/labelIds/**/*.png"


def readme_command_lines() -> list[str]:
    """Every `cityseg …`, `python train.py …`, `python launch/submit.py …` and `accelerate launch …` in the README,
    from its bash blocks and its inline code."""
    text = README.read_text()
    candidates = bash_commands(text) + re.findall(r"`([^`\n]+)`", without_fences(text))
    starts = ("cityseg ", "python train.py ", "python launch/submit.py ", "accelerate launch ")
    lines = []
    for line in candidates:
        line = re.sub(r"^[A-Z_]+=\S+\s+", "", line)  # ACCELERATE_USE_CPU=1 ...
        if line.startswith(starts) and "--config" in line:
            lines.append(line)
    return lines


def without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def parse_readme_command(argv: list[str], submit) -> object:
    """The parsed arguments of one README command, by the parser that will read it (raises SystemExit like it)."""
    if argv[0] == "accelerate":  # the launcher's own flags are accelerate's; check what it starts
        argv = argv[argv.index("train.py"):] if "train.py" in argv else argv[argv.index("-m") + 1:]
    if argv[:2] == ["python", "launch/submit.py"]:
        return submit.parse_args(argv[2:])
    if argv[:2] == ["python", "train.py"]:
        argv = argv[1:]
    if argv[0] == "train.py":
        return build_parser().parse_args(["train", *argv[1:]])
    if argv[0] == "cityseg":
        return build_parser().parse_args(argv[1:])
    raise AssertionError(f"tests/test_docs.py has no rule for a `{argv[0]}` command")


def test_every_readme_command_parses_and_its_config_loads():
    """Flags the parsers know, configs that exist, override keys that the config accepts; in-process, so fast."""
    spec = importlib.util.spec_from_file_location("readme_submit", REPO / "launch" / "submit.py")
    submit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(submit)
    problems = []
    lines = readme_command_lines()
    assert len(lines) >= 5, f"README.md: expected its example commands, found only {lines}"
    for line in lines:
        argparse_says = io.StringIO()
        try:
            with contextlib.redirect_stderr(argparse_says):
                args = parse_readme_command(shlex.split(line), submit)
            load_config(REPO / args.config, args.overrides)
        except SystemExit:  # argparse printed usage and the problem, then exited 2
            said = argparse_says.getvalue().strip().splitlines() or ["exit 2"]
            problems.append(f"README.md: `{line}`: {said[-1]}")
        except Exception as err:  # ConfigError names the key
            problems.append(f"README.md: `{line}`: {type(err).__name__}: {err}")
    assert not problems, "README commands that would not run:\n" + "\n".join(problems)


def demo_layout(root: Path) -> None:
    """The repository's files launch/demo.sh uses, linked into root; its .venv is the one running the tests."""
    for name in ("launch", "configs", "train.py", "pyproject.toml", "constraints.txt"):
        (root / name).symlink_to(REPO / name)
    (root / ".venv").symlink_to(Path(sys.prefix))  # launch/venv.sh finds it current and does nothing


def readme_demo_figure(threads: str) -> tuple[float, float]:
    """(the demo's validation mIoU the README states for this thread count, the spread it states for another CPU)."""
    text = " ".join(README.read_text().split())
    found = re.search(r"Validation mIoU: (0\.\d+) with torch's default 2 threads and (0\.\d+) with one thread "
                      r"\(`OMP_NUM_THREADS=1`\).*?within ±(0\.\d+) of the figure for your thread count", text)
    assert found, "README.md: the demo's figures per thread count and their spread are not where the test reads them"
    return float(found.group(1 if threads == "2" else 2)), float(found.group(3))


@pytest.mark.slow
def test_demo_gives_the_readme_figure(tmp_path):
    """launch/demo.sh as a user runs it (data, the full 160-step training, evaluation), with one thread as every
    test child process: its mIoU is the README's figure for one thread, within the spread the README states."""
    demo_layout(tmp_path)
    result = subprocess.run(["bash", str(tmp_path / "launch" / "demo.sh")], cwd=tmp_path, env=child_env(),
                            capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    measured = float(re.search(r"^demo done: validation mIoU (\d\.\d{3}) ", result.stdout, re.M).group(1))
    stated, spread = readme_demo_figure(child_env()["OMP_NUM_THREADS"])
    assert abs(measured - stated) <= spread, (f"launch/demo.sh gave mIoU {measured:.3f} with OMP_NUM_THREADS="
                                             f"{child_env()['OMP_NUM_THREADS']}; README.md says {stated} (±{spread})")


@pytest.mark.slow
def test_demo_script_trains_in_its_own_run_directory(tmp_path):
    """launch/demo.sh in a copy of the repository's layout (2 steps): it never touches the quick start's runs/demo,
    says when it replaces its own earlier run, and ends with the mIoU line the README quotes."""
    demo_layout(tmp_path)
    quick_start_run = tmp_path / "runs" / "demo" / "model.safetensors"
    quick_start_run.parent.mkdir(parents=True)
    quick_start_run.write_bytes(b"the quick start's weights")
    earlier_demo = tmp_path / "runs" / "demo-sh" / "earlier.txt"
    earlier_demo.parent.mkdir()
    earlier_demo.write_text("an earlier demo run")
    result = subprocess.run(["bash", str(tmp_path / "launch" / "demo.sh"), "train.max_steps=2"], cwd=tmp_path,
                            env=child_env(), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert re.search(r"^demo done: validation mIoU \d\.\d{3} \(runs/demo-sh\)$", result.stdout, re.M), result.stdout
    assert "launch/demo.sh: replacing the previous demo run in runs/demo-sh" in result.stdout
    assert not earlier_demo.exists() and (tmp_path / "runs" / "demo-sh" / "model.safetensors").is_file()
    assert quick_start_run.read_bytes() == b"the quick start's weights"


def test_readme_cpu_multi_process_line_is_a_run_of_its_own_with_the_demos_global_batch():
    """After the quick start, `runs/demo` holds a finished run: a launch into it would only find it and train
    nothing; a doubled global batch would train half the steps."""
    line = next(line for line in readme_command_lines() if "--num_processes 2 train.py" in line)
    argv = shlex.split(line)
    processes = int(argv[argv.index("--num_processes") + 1])
    args = build_parser().parse_args(["train", *argv[argv.index("train.py") + 1:]])
    launched, demo = load_config(REPO / args.config, args.overrides), load_config(REPO / "configs" / "demo.yaml")
    assert launched.output_dir != demo.output_dir, f"README.md: `{line}` trains into the quick start's run"
    assert launched.data.batch_size * processes == demo.data.batch_size, f"README.md: `{line}` changes the global batch"
