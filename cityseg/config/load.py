"""Loading a config: YAML file + dotted key=value overrides -> a validated, typed Config; saving it."""
from __future__ import annotations

import dataclasses
import difflib
import signal
import typing
from pathlib import Path
from typing import Literal

import yaml

from cityseg.config.model_names import ARCHITECTURES, SMP_ENCODERS, TIMM_MODELS
from cityseg.config.schema import RETIRED, Config, ConfigError, ModelConfig
from cityseg.config.upgrade import upgrade_recorded

PAIR_KEYS = ("data.image_size", "data.crop_size", "data.cache.size", "data.scale_range", "eval.crop_size", "eval.stride")


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(key: str, value, hint):
    """Check value against a type hint; returns the value (int → float widened). Raises ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _coerce(key, value, next(a for a in args if a is not type(None)))
    if origin is Literal:  # by type too: 1 is not true (train.compile), true is not 1 (model.aspp_project_kernel)
        if not any(value == allowed and type(value) is type(allowed) for allowed in args):
            spelled = (str(a).lower() if isinstance(a, bool) else str(a) for a in args)  # as YAML writes them
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(spelled)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list of {_type_name(args[0])}, got {value!r}")
        return [_coerce(f"{key}[{i}]", item, args[0]) for i, item in enumerate(value)]
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {_type_name(hint)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, values: dict, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        try:
            kwargs[key] = _field_value(fields, hints, key, value, prefix)
        except ConfigError as err:
            raise ConfigError(str(err), err.key or dotted) from None
    return cls(**kwargs)


def _field_value(fields: dict, hints: dict, key: str, value, prefix: str):
    dotted = f"{prefix}{key}"
    if dotted in RETIRED:
        raise ConfigError(f"'{dotted}' was {RETIRED[dotted]}")
    if key not in fields:
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(fields)})"
        raise ConfigError(f"unknown key '{dotted}'{hint}")
    if dataclasses.is_dataclass(hints[key]):
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted}: expected a mapping of keys, got {value!r}")
        return _build(hints[key], value, dotted + ".")
    value = _coerce(dotted, value, hints[key])
    bounds = fields[key].metadata
    if value is not None and bounds:
        if bounds["low"] is not None and value < bounds["low"]:
            raise ConfigError(f"{dotted}: {value} is below the minimum {bounds['low']}")
        if bounds["high"] is not None and value > bounds["high"]:
            raise ConfigError(f"{dotted}: {value} is above the maximum {bounds['high']}")
    if dotted in PAIR_KEYS and value is not None and (len(value) != 2 or min(value) <= 0):
        raise ConfigError(f"{dotted}: expected two positive numbers [H, W], got {value}")
    if dotted in ("data.mean", "data.std") and value is not None and (len(value) != 3 or min(value) <= 0):
        raise ConfigError(f"{dotted}: expected three positive RGB values in [0, 1] units, got {value}")
    return value


def _check_model_names(model: ModelConfig) -> None:
    """model.arch / model.encoder against smp's names (as smp spells them), without importing smp or timm."""
    spelled = {name.lower(): name for name in ARCHITECTURES}
    if model.arch.lower() not in spelled:  # smp matches case-insensitively; the config keeps smp's spelling
        close = difflib.get_close_matches(model.arch.lower(), list(spelled), n=1)
        hint = f"did you mean '{spelled[close[0]]}'? " if close else ""
        raise ConfigError(f"model.arch: unknown architecture {model.arch!r} ({hint}smp has: "
                          f"{', '.join(ARCHITECTURES)})", "model.arch")
    model.arch = spelled[model.arch.lower()]
    encoder = model.encoder
    if encoder.startswith("tu-"):
        known, name = TIMM_MODELS, encoder[3:].split(".")[0]  # a pretrained tag after the dot is timm's business
    else:
        known, name = SMP_ENCODERS, encoder
    if name not in known:
        close = difflib.get_close_matches(name, sorted(known), n=3)
        prefix = "tu-" if encoder.startswith("tu-") else ""
        hint = f"did you mean {', '.join(prefix + c for c in close)}? " if close else ""
        raise ConfigError(f"model.encoder: unknown encoder {encoder!r} ({hint}smp's own encoders, e.g. resnet50, "
                          "mit_b0, efficientnet-b0, or tu-<any timm model>, e.g. tu-resnet50)", "model.encoder")


def _set_dotted(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
        tree = node
    tree[leaf] = value


def parse_override(text: str) -> tuple[str, object]:
    key, sep, raw = text.partition("=")
    if not sep or not key or " " in key:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw  # a plain string such as a path with odd characters
    return key, value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top, got {type(tree).__name__}")
    return tree


def _source(key: str | None, override_keys: dict, path) -> str:
    """Where a bad key came from: the command line override that set it (or its section), else the file."""
    if key is not None:
        for given in reversed(list(override_keys)):
            if key == given or key.startswith(given + ".") or given.startswith(key + "."):
                return f"command line override {override_keys[given]!r}"
    return str(path) if path is not None else "config"


def load_config(path: str | Path | None, overrides: list[str] = (), recorded: bool = False) -> Config:
    """Read the YAML (if any), apply key=value overrides, validate, and fill output_dir. An error names the file,
    or the command line override the bad key came from. recorded: the file is a run's config.yaml (upgraded)."""
    tree = read_yaml(path) if path is not None else {}
    tree = upgrade_recorded(tree) if recorded else tree
    override_keys = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        override_keys[key] = text
    try:
        config = _build(Config, tree, "")
        _check_config(config)
    except ConfigError as err:
        raise ConfigError(f"{_source(err.key, override_keys, path)}: {err}", err.key) from None
    steps = config.train.profile_steps
    if steps is not None and (len(steps) != 2 or steps[0] < 0 or steps[1] < steps[0]):
        raise ConfigError(f"{path or 'config'}: train.profile_steps: expected [first, last] steps, 0 <= first "
                          f"<= last, got {steps}")
    if config.output_dir is None:
        config.output_dir = str(Path("runs") / config.name)
    return config


def _check_config(config: Config) -> None:
    """Checks across keys or against outside names; each error carries its key."""
    for name in config.train.preempt_signals:
        if name not in signal.Signals.__members__:
            raise ConfigError(f"train.preempt_signals: unknown signal {name!r} (e.g. SIGUSR1)", "train.preempt_signals")
    if config.train.epochs is None and config.train.max_steps is None:
        raise ConfigError("train.epochs is null (iteration-based) but train.max_steps is not set", "train.epochs")
    if not config.eval.scales or min(config.eval.scales) <= 0:
        raise ConfigError("eval.scales: expected positive factors, e.g. [0.5, 1.0, 1.5]", "eval.scales")
    _check_model_names(config.model)


def run_config_path(weights: str | Path) -> Path:
    """The config.yaml recorded beside weights: in a checkpoint directory, or in the run directory above it."""
    path = Path(weights)
    candidates = [path / "config.yaml"] if path.is_dir() else []
    candidates += [path.parent / "config.yaml", path.parent.parent / "config.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{weights}: no config.yaml recorded in its run directory; name the config with --config")


def dump_config(config: Config) -> str:
    """The resolved config as YAML: what `cityseg config` prints and config.yaml holds."""
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=None)  # lists on one line


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def from_dict(tree: dict) -> Config:
    return _build(Config, tree, "")


def save_config(config: Config, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(dump_config(config))
    tmp.replace(path)
