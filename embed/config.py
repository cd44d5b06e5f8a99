"""Recipe configuration shared by the four scripts.

One YAML recipe describes a run; `--dotted.key value` on the command line overrides any key
(list items by index: `--train.stages.0.learning_rate 1.0e-05`). Like TRL's parser, the YAML
only sets defaults and the command line wins; unlike a plain argparse setup, an unknown or
misspelled key is an error that names it (contrastors once lost a whole data section to a typo),
and so is a value of the wrong type. The merged config is saved in `run_dir` so a run can be
reproduced from its own folder.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from embed.data import check_eval_folders
from embed.errors import ConfigError
from embed.io import write_text_atomic
from embed.recipe import Recipe


# ---------------------------------------------------------------- type checking
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_optional(tp) -> tuple[bool, Any]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _type_name(tp) -> str:
    opt, inner = _is_optional(tp)
    if opt:
        return f"{_type_name(inner)} or null"
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` checked against the annotation `tp`, or raise ConfigError naming `key`."""
    opt, inner = _is_optional(tp)
    if value is None:
        if opt:
            return None
        raise ConfigError(f"key '{key}' must be {_type_name(tp)}, got null")
    tp = inner
    origin = get_origin(tp)
    bad = ConfigError(f"key '{key}' must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return from_dict(tp, value, key + ".")
    if origin is Literal:
        if value not in get_args(tp):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # a single value where a list is expected: `--data.eval DIR`
        return [coerce(v, get_args(tp)[0], f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `2e-5` as a string; accept it, it is unambiguous
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported annotation {tp} for key '{key}'")


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, rejecting unknown keys by their dotted name."""
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise unknown_key(cls, prefix, str(key))
        kwargs[key] = coerce(value, hints[key], prefix + key)
    return cls(**kwargs)


def _item_class(tp) -> Any:
    """The dataclass of a list's items (`list[StageConfig]` -> StageConfig), else None."""
    _, tp = _is_optional(tp)
    if get_origin(tp) is list and dataclasses.is_dataclass(get_args(tp)[0]):
        return get_args(tp)[0]
    return None


def unknown_key(cls, prefix: str, key: str) -> ConfigError:
    """The error for `prefix + key`, which dataclass `cls` lacks, with the key the user probably meant.

    A key that exists on the items of a list (`train.learning_rate` is per stage) is named with its
    index syntax, `train.stages.N.learning_rate`; otherwise the closest spelling, if any.
    """
    hints = _hints(cls)
    lists = [prefix + name for name, tp in hints.items()
             if _item_class(tp) is not None and key in _hints(_item_class(tp))]
    if lists:
        per_item = " or ".join(f"'{name}.N.{key}'" for name in lists)
        return ConfigError(f"unknown key '{prefix}{key}': it is set per item of '{lists[0]}', as {per_item} "
                           f"with N the item's index from 0 (the first: --{lists[0]}.0.{key})")
    close = difflib.get_close_matches(key, list(hints), n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown key '{prefix}{key}'{hint}")


def to_dict(obj) -> Any:
    """Plain YAML-able data from a (possibly nested) dataclass."""
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return obj


# ---------------------------------------------------------------- dotted keys
def _type_at(schema, parts: list[str]) -> Any:
    """The annotation of the dotted key `parts` inside dataclass `schema` (list indices allowed)."""
    tp: Any = schema
    walked = []
    for part in parts:
        _, tp = _is_optional(tp)
        walked.append(part)
        if dataclasses.is_dataclass(tp):
            hints = _hints(tp)
            if part not in hints:
                raise unknown_key(tp, "".join(w + "." for w in walked[:-1]), part)
            tp = hints[part]
        elif get_origin(tp) is list and part.isdigit():
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = Any
        else:
            raise ConfigError(f"unknown key '{'.'.join(walked)}'")
    return tp


def _parse_cli_value(raw: str, tp: Any) -> Any:
    _, inner = _is_optional(tp)
    if inner is str and raw not in ("null", "~"):
        return raw  # keep strings verbatim: `--run_dir 0001` stays "0001"
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _set_dotted(tree: dict, parts: list[str], value: Any, key: str) -> None:
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        nxt_is_index = parts[i + 1].isdigit()
        if isinstance(node, list):
            idx = int(part)
            if idx >= len(node):
                raise ConfigError(f"key '{key}': index {idx} is past the end of a list of {len(node)}")
            node = node[idx]
        else:
            if node.get(part) is None:
                if nxt_is_index:
                    raise ConfigError(f"key '{key}': '{part}' is not set in the recipe, so it has no index")
                node[part] = {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last)
        if idx >= len(node):
            raise ConfigError(f"key '{key}': index {idx} is past the end of a list of {len(node)}")
        node[idx] = value
    else:
        node[last] = value


def parse_overrides(schema, argv: list[str]) -> tuple[str | None, list[tuple[str, Any]]]:
    """Split argv into the recipe path and typed (dotted key, value) overrides."""
    recipe, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            if recipe is not None:
                raise ConfigError(f"unexpected argument '{arg}' (only one recipe file may be given)")
            recipe = arg
            i += 1
            continue
        key, eq, raw = arg[2:].partition("=")
        tp = _type_at(schema, key.split("."))
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or (nxt.startswith("--") and not _looks_numeric(nxt)):
                if _is_optional(tp)[1] is bool:
                    raw = "true"  # a bare boolean flag: `--train.gradient_checkpointing`
                else:
                    raise ConfigError(f"key '{key}' needs a value")
            else:
                raw = nxt
                i += 1
        overrides.append((key, _parse_cli_value(raw, tp)))
        i += 1
    return recipe, overrides


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- loading
def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {path} is not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"recipe {path}{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: the top level must be a mapping of keys")
    return data


def _deep_merge(base: dict, update: dict) -> dict:
    """`update` over `base`, recursing into mappings; lists and scalars are replaced whole."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(schema, argv: list[str]):
    """Merge recipe YAML and command-line overrides into a validated `schema` instance."""
    recipe, overrides = parse_overrides(schema, argv)
    tree = _deep_merge(to_dict(schema()), load_yaml(recipe) if recipe else {})
    source = recipe or "the command line"
    try:
        for key, value in overrides:
            _set_dotted(tree, key.split("."), value, key)
        return from_dict(schema, tree)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def format_help(schema, prog: str, description: str) -> str:
    lines = [f"usage: {prog} RECIPE.yaml [--key value ...]", "", description.strip(), "",
             "Nested keys take dots (--train.temperature 0.05); items of a list take their index, from 0",
             "(--train.stages.0.learning_rate 1.0e-05 sets the first stage's; .N. below stands for the index).",
             "", "keys (default):"]

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = _hints(cls)[f.name]
            _, inner = _is_optional(tp)
            if dataclasses.is_dataclass(inner):
                walk(inner, prefix + f.name + ".")
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = yaml.safe_dump(to_dict(default), default_flow_style=True, width=10**6).strip()
            shown = shown.removesuffix("\n...").removesuffix("...").strip()
            doc = f.metadata.get("help", "")
            lines.append(f"  --{prefix}{f.name} ({_type_name(tp)}) = {shown}" + (f"\n      {doc}" if doc else ""))
            if _item_class(tp) is not None:
                walk(_item_class(tp), prefix + f.name + ".N.")

    walk(schema, "")
    return "\n".join(lines)


def save_config(config, path: str | os.PathLike) -> None:
    """Write the merged config atomically, so a run folder always says what it ran with."""
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def _names_a_local_path(spec: str) -> bool:
    """What the data loaders read as a file or folder: a path with a separator, `./...`, or `*.jsonl`.
    A spec with a scheme (`builtin:...`) or a bare name (an HF dataset id) is resolved by them."""
    if re.match(r"[A-Za-z][\w+.-]*:", spec):
        return False
    return os.sep in spec or "/" in spec or spec.startswith(".") or spec.endswith(".jsonl")


def check_paths(config: Recipe) -> None:
    """A data path that does not exist is an error now, before run_dir is created or a model loads."""
    spec = config.data.corpus
    if spec and _names_a_local_path(spec) and not Path(spec).exists():
        raise ConfigError(f"key 'data.corpus': {spec} does not exist (a BEIR folder, its corpus.jsonl, "
                          "builtin:<name> or an HF dataset id)")


def load_recipe(argv: list[str]) -> Recipe:
    """The validated config for `RECIPE.yaml [--key value ...]`, with nothing written."""
    config = build_config(Recipe, argv)
    config.validate()
    check_paths(config)
    return config


def parse_recipe(stage: str, argv: list[str] | None = None, description: str = ""):
    """Parse `RECIPE.yaml [--key value ...]` for `stage`; once it is valid, create run_dir and save
    `<stage>_config.yaml` (a mistake leaves no run folder behind)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(format_help(Recipe, os.path.basename(sys.argv[0]), description or f"{stage} stage"))
        raise SystemExit(0)
    config = load_recipe(argv)
    if stage != "eval":  # a data problem that would stop evaluation stops this stage now, not hours later
        check_eval_folders(config.data.eval, config.data.eval_split)
    Path(config.run_dir).mkdir(parents=True, exist_ok=True)
    save_config(config, Path(config.run_dir) / f"{stage}_config.yaml")
    return config


def pipeline_stages(config) -> list[str]:
    """The stages a recipe's pipeline runs: mining when a training stage reads its train.jsonl (or it
    chooses the lexical weight), generation when mining reads generated queries; training, evaluation."""
    mined = str(Path(config.run_dir) / "train.jsonl")
    reads_mined = any(entry.replace("{run_dir}", config.run_dir) == mined
                      for stage in config.train.stages for entry in stage.data)
    mine = reads_mined or config.model.lexical_weight_rule == "generated"
    return [*(["gen"] if mine and config.mine.generated else []), *(["mine"] if mine else []), "train", "eval"]


def check_main() -> None:
    """`python -m embed.config RECIPE.yaml [--key value ...]`: check a recipe and its overrides for every
    stage at once and write nothing; pipeline.sh runs it before its first stage."""
    if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:
        print(format_help(Recipe, "python -m embed.config", "Check a recipe and its overrides; write nothing."))
        return
    config = load_recipe(sys.argv[1:])
    check_eval_folders(config.data.eval, config.data.eval_split)
    print(f"recipe ok: run_dir {config.run_dir}")
    print("stages: " + " ".join(pipeline_stages(config)))


if __name__ == "__main__":
    from embed.cli import run_main

    run_main(check_main)
