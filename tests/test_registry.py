"""The method registry as a user's package meets it: one module and one entry-point line add a method, presets
select the paper's columns by tag, and selections that cannot be met are one-line errors."""
import sys
import textwrap
import uuid

import pytest

from bench import methods
from bench.cli import parse_config, run_main
from bench.config import BenchmarkConfig
from bench.errors import UserError
from bench.methods import available_methods, create_method, select_methods, tagged_methods, variant
from pipelines.full_benchmark import PRESETS, main, resolve_methods, with_method_names

# What the presets ran before they selected by tag: the resolved lists must not change.
PAPER_COLUMNS = ["sahn_paper", "ec", "ctsdg", "spl", "spn", "lama_fourier", "ddnm", "biharmonic", "diffusion_fill"]
DEFAULT_METHODS = ["biharmonic", "ctsdg_tiny", "ddnm_tiny", "diffusion_fill", "ec_tiny", "lama_tiny", "sahn_tiny",
                   "spl_tiny", "spn_tiny"]

PLUGIN_MODULE = """
    import dataclasses

    import torch

    from bench.methods import InpaintingMethod, apply_overrides, variant


    @dataclasses.dataclass
    class PluginConfig:
        strength: float = 0.5


    class PluginMethod(InpaintingMethod):
        def inpaint(self, images, masks):
            return images * (1 - masks) + self.config.strength * masks


    @variant(scale="paper", paper_name="Plugin", trainable=False, paper_column=10)
    def {prefix}_paper(**overrides):
        return PluginMethod(apply_overrides(PluginConfig(), overrides))


    @variant(scale="tiny", paper_name="Plugin", trainable=False)
    def {prefix}_tiny(**overrides):
        return PluginMethod(apply_overrides(PluginConfig(strength=0.25), overrides))
"""


@pytest.fixture(autouse=True)
def installed_methods_only(monkeypatch):
    # Other test modules register methods in this process at import (test_tiny is a tiny variant): the presets
    # here must see what an installation registers, as the command line does.
    monkeypatch.setattr(methods, "_LOCAL", {})


@pytest.fixture
def install(tmp_path, monkeypatch):
    """``install({"file.py": source}, entry_lines)``: a distribution on sys.path whose ``sahn_bench.methods`` group
    holds ``entry_lines``, as ``pip install`` of a user's package would leave it; gone after the test."""
    added = []

    def make(files: dict[str, str], entry_lines: list[str]) -> None:
        for name, text in files.items():
            (tmp_path / name).write_text(textwrap.dedent(text))
            added.append(name.removesuffix(".py"))
        info = tmp_path / f"fake_plugin_{uuid.uuid4().hex[:8]}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {info.name.split('-')[0]}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text("[sahn_bench.methods]\n" + "\n".join(entry_lines) + "\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        methods.refresh_registry()

    yield make
    for module in added:
        sys.modules.pop(module, None)
    monkeypatch.undo()
    methods.refresh_registry()


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"  # a module name no earlier test imported


def test_one_module_and_one_entry_point_line_add_a_method_picked_by_name_scale_and_tag(install):
    module, prefix = unique("my_methods"), unique("mine")
    install({f"{module}.py": PLUGIN_MODULE.replace("{prefix}", prefix)}, [f"mine = {module}"])
    assert module not in sys.modules  # nothing is imported before a method is asked for
    method = create_method(f"{prefix}_paper", strength=0.75)
    assert module in sys.modules
    assert method.name == f"{prefix}_paper" and method.paper_name == "Plugin" and method.config.strength == 0.75
    assert create_method(f"{prefix}_tiny").config.strength == 0.25
    assert f"{prefix}_tiny" in available_methods("tiny") and f"{prefix}_tiny" not in available_methods("paper")
    assert "mine" not in available_methods()  # the line's own name only labels it
    assert tagged_methods("paper_column") == PAPER_COLUMNS + [f"{prefix}_paper"]  # after the paper's 9 columns
    assert select_methods(["ec", "tag:paper_column", "sahn_tiny"]) == (
        ["ec"] + [m for m in PAPER_COLUMNS if m != "ec"] + [f"{prefix}_paper", "sahn_tiny"])


def test_a_module_function_entry_point_still_names_one_method_and_loads_only_when_asked_for(install):
    module = unique("old_style")
    install({f"{module}.py": """
        from bench.methods import variant
        from baselines.classical import biharmonic


        @variant(scale="any", trainable=False)
        def make(**overrides):
            return biharmonic(**overrides)
    """}, [f"old_fill = {module}:make"])
    assert "old_fill" in available_methods() and "make" not in available_methods()
    assert module not in sys.modules  # listed from the metadata alone, as before
    assert create_method("old_fill").name == "old_fill"
    assert "old_fill" in available_methods("tiny")


def test_a_broken_plugin_is_skipped_with_a_warning_and_named_when_its_method_is_asked_for(install):
    module = unique("broken_methods")
    install({f"{module}.py": "raise ImportError('needs a package that is not installed')\n"}, [f"broken = {module}"])
    with pytest.warns(UserWarning, match="entry point 'broken'.*needs a package"):
        names = available_methods()
    assert "sahn_tiny" in names
    with pytest.raises(UserError, match=f"unknown method 'gone'.*failed to load: {module}.*needs a package"):
        create_method("gone")


def test_a_name_registered_twice_warns_and_keeps_the_first(install):
    first, second = unique("first_methods"), unique("second_methods")
    body = """
        from bench.methods import variant
        from baselines.classical import biharmonic


        @variant(scale="any", trainable=False, paper_column={column})
        def twin(**overrides):
            return biharmonic(**overrides)
    """
    install({f"{first}.py": body.format(column=20), f"{second}.py": body.format(column=21)},
            [f"a = {first}", f"b = {second}"])
    with pytest.warns(UserWarning, match=f"'twin' is registered by both {first}:twin and {second}:twin"):
        assert "twin" in available_methods()
    assert methods.get_factory("twin").paper_column == 20


@variant(scale="tiny", paper_column=1)
def decorated_here(**overrides):
    return create_method("biharmonic", **overrides)


def test_constructors_decorated_outside_an_entry_point_module_stay_out_of_the_registry():
    assert "decorated_here" not in available_methods() and "decorated_here" not in available_methods("tiny")
    assert "decorated_here" not in tagged_methods("paper_column")


def test_the_presets_resolve_to_the_methods_they_ran_before_tags():
    paper = parse_config(BenchmarkConfig, ["--config", "paper"], presets=PRESETS, default_preset="default",
                         description="")
    assert paper.methods == ["tag:paper_column"] and paper.save_images == "sample"
    assert resolve_methods(paper) == PAPER_COLUMNS
    assert with_method_names(paper, resolve_methods(paper)).methods == PAPER_COLUMNS  # what config.json records
    default = parse_config(BenchmarkConfig, [], presets=PRESETS, default_preset="default", description="")
    assert resolve_methods(default) == DEFAULT_METHODS
    assert with_method_names(default, DEFAULT_METHODS).methods == []  # recorded as before
    assert "ddnm_imagenet" not in PAPER_COLUMNS and methods.get_factory("ddnm_imagenet").paper_name == "DDNM"


def test_methods_flag_takes_tags_and_help_says_so(capsys):
    config = parse_config(BenchmarkConfig, ["--config", "paper", "--methods", "tag:paper_column", "big_lama"],
                          presets=PRESETS, default_preset="default", description="")
    assert resolve_methods(config) == PAPER_COLUMNS + ["big_lama"]
    with pytest.raises(SystemExit):
        parse_config(BenchmarkConfig, ["--help"], presets=PRESETS, default_preset="default", description="")
    assert "tag:paper_column" in " ".join(capsys.readouterr().out.split())


def test_an_unknown_tag_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(UserError, match=r"^unknown method tag tag:papers; tags: tag:paper_column \("):
        select_methods(["tag:papers"])
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main(["--methods", "tag:papers", "--out", str(tmp_path / "out"), "--serial"]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown method tag tag:papers") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()  # refused before anything was written
    with pytest.raises(UserError, match="unknown method 'tag-paper_column' .select by tag with tag:NAME"):
        select_methods(["tag-paper_column"])
