"""Shared CLI plumbing: simple-parsing dataclass configs with YAML presets, one-line user errors.

Every entry point parses its config with :func:`parse_config`, so all of them share three behaviours:
``--config`` takes a bundled preset name or a YAML file (flags override it), ``--help`` shows the values
the run would use (the preset's, not the dataclass defaults), and dict-typed fields take a mapping on the
command line in JSON, Python-literal or YAML flow style.
"""
from __future__ import annotations

import argparse
import ast
import json
import shlex
import sys
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import simple_parsing
import yaml

from bench.errors import UserError

T = TypeVar("T")
CONFIG_FLAGS = ("--config", "--config-file", "--config_file")
HEADER_WIDTH = 100  # the width the entry points' docstrings are written to
MAPPING_NOTE = ("Options shown as `dict` take a mapping in JSON or YAML flow style, like the example in their "
                "help; given on the command line, it replaces the preset's whole mapping for that option rather "
                "than merging into it ('{}' clears it).")


def preset_path(value: str, presets: Path) -> str:
    """``--config default`` names a bundled preset (``<presets>/default.yaml``); anything else is a YAML path."""
    bundled = presets / f"{value}.yaml"
    if bundled.exists():
        return str(bundled)
    path = Path(value).expanduser()
    if not path.is_file():
        names = ", ".join(preset_names(presets))
        raise UserError(f"--config {value}: neither a preset ({names}) nor a YAML file")
    return str(path)


def preset_names(presets: Path) -> list[str]:
    return sorted(p.stem for p in presets.glob("*.yaml"))


# ------------------------------------------------------------------------------------------ mapping options
def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "")


def _mismatch(value: Any, hint: Any, where: str) -> str | None:
    """Where ``value`` departs from the annotation ``hint`` (``None`` when it fits). Types this does not
    know are accepted: the config's own checks see the value later."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return None
    if hint is type(None):
        return None if value is None else f"{where}{value!r} is not null"
    if origin in (typing.Union, types.UnionType):
        if all(_mismatch(value, member, where) for member in typing.get_args(hint)):
            return f"{where}{value!r} is not a {_type_name(hint)}"
        return None
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return f"{where}{value!r} is not a mapping"
        key_hint, value_hint = typing.get_args(hint) or (Any, Any)
        for key, item in value.items():
            problem = _mismatch(key, key_hint, f"{where}key ") or _mismatch(item, value_hint, f"{where}{key}: ")
            if problem:
                return problem
        return None
    if origin is list or hint is list:
        if not isinstance(value, list):
            return f"{where}{value!r} is not a list"
        (item_hint,) = typing.get_args(hint) or (Any,)
        for index, item in enumerate(value):
            problem = _mismatch(item, item_hint, f"{where}[{index}] ")
            if problem:
                return problem
        return None
    if hint is float:
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        fits = isinstance(value, int) and not isinstance(value, bool)
    elif hint in (str, bool):
        fits = isinstance(value, hint)
    else:
        return None
    return None if fits else f"{where}{value!r} is not a {_type_name(hint)}"


def read_mapping_text(text: str) -> Any:
    """The value a command-line mapping spells. JSON is read as JSON first: the YAML 1.1 reader takes
    ``1e-4`` for a string. Python literals come next (``None``, ``True``); then YAML flow style, which
    reads the text as a preset file would. Raises ``ValueError`` when no reader accepts it."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def _braced(text: str) -> str | None:
    """The first balanced ``{...}`` in ``text`` (the example a field's help gives), if any."""
    start = text.find("{")
    if start < 0:
        return None
    depth = 0
    for index in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[start:index + 1]
    return None


def _placeholder(hint: Any) -> str:
    """A made-up value of type ``hint``, for a field whose help gives no example."""
    origin = typing.get_origin(hint)
    if origin is dict:
        _, value_hint = typing.get_args(hint) or (Any, Any)
        return f"{{name: {_placeholder(value_hint)}}}"
    if origin in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(hint) if m is not type(None)]
        return _placeholder(members[0])
    if origin is list:
        return "[]"
    return {int: "1", float: "0.5", bool: "true"}.get(hint, "value")


class MappingOption:
    """argparse ``type`` of a dict-typed field: reads JSON / Python / YAML flow text and checks it against
    the field's annotation; anything else is one :class:`UserError` line naming the flag, with an example."""

    def __init__(self, flag: str, hint: Any, help_text: str | None):
        self.flag = flag
        self.hint = hint
        example = _braced(help_text or "")
        if example is None or self._read(example)[1] is not None:
            example = _placeholder(hint)
        self.example = f"{flag} {shlex.quote(example)}"

    def _read(self, text: str) -> tuple[Any, str | None]:
        """(the value, what is wrong with it or ``None``)."""
        try:
            value = read_mapping_text(text)
        except ValueError:
            return None, "neither JSON nor YAML flow style"
        if not isinstance(value, dict):
            return value, "not a mapping"
        glued = _glued_key(value)
        if glued is not None:
            return value, f"YAML reads {glued!r} as one key without a value (it needs a space after each ':')"
        return value, _mismatch(value, self.hint, "")

    def __call__(self, text: str) -> dict:
        value, problem = self._read(text)
        if problem is not None:
            raise UserError(f"{self.flag} {shlex.quote(text)}: {problem}; give a mapping in JSON or YAML flow "
                            f"style, e.g. {self.example}")
        return value


def _glued_key(value: Any) -> str | None:
    """A key like ``alpha:0.4`` with no value, at any depth: what YAML makes of ``{alpha:0.4}``."""
    if not isinstance(value, dict):
        return None
    for key, item in value.items():
        if item is None and isinstance(key, str) and ":" in key:
            return key
        glued = _glued_key(item)
        if glued is not None:
            return glued
    return None


def _is_mapping_type(hint: Any) -> bool:
    return typing.get_origin(hint) is dict or hint is dict


class ConfigParser(simple_parsing.ArgumentParser):
    """simple-parsing's parser whose dict-typed fields read a mapping from the command line.

    simple-parsing 0.1.9 hands argparse the annotation itself (``dict[str, dict[str, Any]]``) as the type,
    which rejects every string. Its actions exist only once it has resolved the dataclass tree (conflicting
    names, nesting), so the types are swapped right after that step, for every field at any depth."""

    def _preprocessing(self, *args: Any, **kwargs: Any) -> None:
        super()._preprocessing(*args, **kwargs)
        for action in self._actions:
            if _is_mapping_type(action.type):
                action.type = MappingOption(action.option_strings[0], action.type, action.help)
                action.metavar = "dict"  # what the help header's note on mappings refers to


# ------------------------------------------------------------------------------------------ presets and --help
def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the value of ``--config`` if given, the other arguments)."""
    reader = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    reader.add_argument(*CONFIG_FLAGS, dest="config", action="append")
    try:
        found, rest = reader.parse_known_args(argv)
    except argparse.ArgumentError:
        raise UserError("--config needs a preset name or a YAML file") from None
    if found.config and len(found.config) > 1:
        raise UserError(f"--config given {len(found.config)} times ({', '.join(found.config)}): give one preset "
                        "or YAML file")
    return (found.config[0] if found.config else None), rest


def _defaults_note(chosen: str | None, path: str | None, presets: Path) -> str:
    """The help header's sentence on where the shown defaults come from and how to pick others."""
    if path is None:
        source = "Defaults shown are the built-in ones"
    elif path == str(presets / f"{chosen}.yaml"):
        source = f"Defaults shown are the `{chosen}` preset's ({path}"
    else:
        source = f"Defaults shown are those of {path} ("
    if path is not None:
        source += "; options it leaves out keep their built-in default)"
    others = [name for name in preset_names(presets) if name != chosen]
    switch = f"--config {' / '.join(others)} shows and runs another preset, " if others else ""
    return f"{source}; {switch}--config FILE.yaml your own file. Flags override these defaults."


def parse_config(cls: type[T], argv: Sequence[str] | None, *, presets: Path, default_preset: str | None,
                 description: str) -> T:
    """Parse ``cls`` from the command line; ``--config`` takes a preset name or a YAML file, and flags
    override it. Without ``--config`` the ``default_preset`` applies, to the run and to the defaults
    ``--help`` shows alike. A dict-typed field given on the command line replaces the preset's value."""
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen, argv = _split_config_flag(argv)
    chosen = chosen or default_preset
    path = preset_path(chosen, presets) if chosen else None
    notes = [textwrap.fill(note, HEADER_WIDTH) for note in (_defaults_note(chosen, path, presets), MAPPING_NOTE)]
    header = "\n\n".join([description.rstrip(), *notes])
    # Every field gets its full dotted flag (--masks.source) and, where unambiguous, a short one (--steps).
    parser = ConfigParser(add_option_string_dash_variants=simple_parsing.DashVariant.DASH,
                          argument_generation_mode=simple_parsing.ArgumentGenerationMode.BOTH,
                          nested_mode=simple_parsing.NestedMode.WITHOUT_ROOT, description=header,
                          formatter_class=simple_parsing.SimpleHelpFormatter)
    parser.add_arguments(cls, dest="options")
    # Read above; declared here so --help lists it, and so an abbreviation (--conf) cannot slip through unread.
    parser.add_argument(CONFIG_FLAGS[0], dest="abbreviated_config", metavar="PRESET|FILE", default=argparse.SUPPRESS,
                        help=f"a preset ({', '.join(preset_names(presets))}) or a YAML file of option values"
                             + (f" (default: {default_preset})" if default_preset else ""))
    if path is not None:
        parser.set_defaults(path)
    parsed = parser.parse_args(argv)
    if hasattr(parsed, "abbreviated_config"):
        raise UserError(f"write --config in full (got an abbreviation of it with {parsed.abbreviated_config!r})")
    return parsed.options


def run_main(main: Callable[[], Any]) -> None:
    """Run an entry point; user errors are one line on stderr and exit code 2, never a traceback."""
    try:
        main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: finished work is kept; re-run the same command to resume", file=sys.stderr)
        sys.exit(130)
