"""Shared CLI plumbing: simple-parsing dataclass configs with YAML presets, one-line user errors."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import simple_parsing

from bench.errors import UserError

T = TypeVar("T")
CONFIG_FLAGS = ("--config", "--config-file", "--config_file")


def preset_path(value: str, presets: Path) -> str:
    """``--config default`` names a bundled preset (``<presets>/default.yaml``); anything else is a YAML path."""
    bundled = presets / f"{value}.yaml"
    if bundled.exists():
        return str(bundled)
    path = Path(value).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in presets.glob("*.yaml")))
        raise UserError(f"--config {value}: neither a preset ({names}) nor a YAML file")
    return str(path)


def parse_config(cls: type[T], argv: Sequence[str] | None, *, presets: Path, default_preset: str | None,
                 description: str) -> T:
    """Parse ``cls`` from the command line; ``--config`` takes a preset name or a YAML file, and flags
    override it. Without ``--config`` the ``default_preset`` applies."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = [flag for flag in CONFIG_FLAGS if flag in argv]
    for flag in given:
        index = argv.index(flag)
        if index + 1 >= len(argv):
            raise UserError(f"{flag} needs a preset name or a YAML file")
        argv[index:index + 2] = ["--config", preset_path(argv[index + 1], presets)]
    if default_preset and not given and not any(a in ("-h", "--help") for a in argv):
        argv = ["--config", preset_path(default_preset, presets), *argv]
    # Every field gets its full dotted flag (--masks.source) and, where unambiguous, a short one (--steps).
    parser = simple_parsing.ArgumentParser(add_option_string_dash_variants=simple_parsing.DashVariant.DASH,
                                           argument_generation_mode=simple_parsing.ArgumentGenerationMode.BOTH,
                                           nested_mode=simple_parsing.NestedMode.WITHOUT_ROOT,
                                           add_config_path_arg="config", description=description,
                                           formatter_class=simple_parsing.SimpleHelpFormatter)
    parser.add_arguments(cls, dest="options")
    return parser.parse_args(argv).options


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
