import re
import shlex

import pytest

from bench.cli import parse_config, run_main
from bench.config import BenchmarkConfig, flatten, from_dict, to_dict
from bench.errors import UserError
from pipelines.full_benchmark import PRESETS


def test_default_preset_applies_and_flags_override_it():
    config = parse_config(BenchmarkConfig, ["--steps", "7", "--datasets", "faces", "folder:/tmp/x"],
                          presets=PRESETS, default_preset="default", description="")
    assert config.train.steps == 7
    assert config.data.datasets == ["faces", "folder:/tmp/x"]
    assert config.data.image_size == 64  # from presets/benchmark/default.yaml, not the dataclass default


def test_paper_preset_and_yaml_file(tmp_path):
    paper = parse_config(BenchmarkConfig, ["--config", "paper"], presets=PRESETS, default_preset="default",
                         description="")
    assert paper.scale == "paper" and paper.masks.source == "nvidia" and paper.data.image_size == 256
    custom = tmp_path / "best.yaml"
    custom.write_text("method_options:\n  sahn_tiny:\n    alpha: 0.4\ntrain:\n  steps: 3\n")
    config = parse_config(BenchmarkConfig, ["--config", str(custom)], presets=PRESETS, default_preset="default",
                          description="")
    assert config.method_options == {"sahn_tiny": {"alpha": 0.4}} and config.train.steps == 3


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="neither a preset .*default.*paper"):
        parse_config(BenchmarkConfig, ["--config", "nope"], presets=PRESETS, default_preset=None, description="")


def test_config_round_trips_through_dicts_and_flattens_for_mlflow():
    config = BenchmarkConfig()
    assert from_dict(BenchmarkConfig, to_dict(config)) == config
    flat = flatten(to_dict(config))
    assert flat["train.steps"] == config.train.steps and flat["data.image_size"] == config.data.image_size


def test_run_main_prints_user_errors_as_one_line(capsys):
    def fail():
        raise UserError("bad flag --x")

    with pytest.raises(SystemExit) as info:
        run_main(fail)
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: bad flag --x\n"


# ----------------------------------------------------------------------------------- mappings on the command line
def parse_benchmark(argv: list[str]) -> BenchmarkConfig:
    """As ``python -m pipelines.full_benchmark`` parses its command line."""
    return parse_config(BenchmarkConfig, argv, presets=PRESETS, default_preset="default", description="")


MAPPING_CASES = {
    "method_options": ({"sahn_tiny": {"alpha": 0.4}, "ec": {"teacher": None, "lr": 0.0001}},
                       {"json": '{"sahn_tiny": {"alpha": 0.4}, "ec": {"teacher": null, "lr": 1e-4}}',
                        "yaml flow": "{sahn_tiny: {alpha: 0.4}, ec: {teacher: null, lr: 0.0001}}",
                        "python": "{'sahn_tiny': {'alpha': 0.4}, 'ec': {'teacher': None, 'lr': 1e-4}}"}),
    "train_options": ({"ddnm_tiny": {"steps": 400, "finetune": True}},
                      {"json": '{"ddnm_tiny": {"steps": 400, "finetune": true}}',
                       "yaml flow": "{ddnm_tiny: {steps: 400, finetune: true}}",
                       "python": "{'ddnm_tiny': {'steps': 400, 'finetune': True}}"}),
    "weights": ({"ec": {"celeba": "/ckpt/ec/celeba", "paris": "/ckpt/ec/paris"}, "lama_fourier": "/ckpt/big-lama"},
                {"json": '{"ec": {"celeba": "/ckpt/ec/celeba", "paris": "/ckpt/ec/paris"}, '
                         '"lama_fourier": "/ckpt/big-lama"}',
                 "yaml flow": "{ec: {celeba: /ckpt/ec/celeba, paris: /ckpt/ec/paris}, lama_fourier: /ckpt/big-lama}",
                 "python": "{'ec': {'celeba': '/ckpt/ec/celeba', 'paris': '/ckpt/ec/paris'}, "
                           "'lama_fourier': '/ckpt/big-lama'}"}),
}


@pytest.mark.parametrize("style", ["json", "yaml flow", "python"])
@pytest.mark.parametrize("name", sorted(MAPPING_CASES))
def test_every_mapping_option_is_settable_on_the_command_line(name, style):
    expected, spellings = MAPPING_CASES[name]
    flag = "--" + name.replace("_", "-")
    config = parse_benchmark([flag, spellings[style], "--steps", "3"])
    assert getattr(config, name) == expected
    assert config.train.steps == 3 and config.data.image_size == 64  # the flag after it and the preset still apply
    assert getattr(parse_benchmark([f"{flag}={spellings[style]}"]), name) == expected


def help_text(main, argv: list[str], capsys) -> str:
    """What ``--help`` prints, with the wrapping undone."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def help_of_option(text: str, flag: str) -> str:
    """The help of one option: from its flag to the next option, without the ``(default: ...)`` tail."""
    start = text.index(f" {flag} dict ")
    following = text.find(" --", start + len(flag) + 2)
    return text[start:following if following > 0 else None].split("(default:")[0]


@pytest.mark.parametrize("name", sorted(MAPPING_CASES))
def test_the_example_in_the_help_of_each_mapping_option_parses(name, capsys):
    from pipelines.full_benchmark import main

    flag = "--" + name.replace("_", "-")
    example = re.search(r"\{.*\}", help_of_option(help_text(main, ["--help"], capsys), flag)).group(0)
    value = getattr(parse_benchmark([flag, example]), name)
    assert value and value == getattr(parse_benchmark([flag, example.replace('"', "")]), name)  # and as YAML flow


def test_a_mapping_on_the_command_line_replaces_the_presets_whole_mapping(tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("method_options:\n  sahn_tiny: {alpha: 0.4}\n  ec: {lr: 0.001}\nweights:\n  ec: /ckpt/ec\n")
    config = parse_benchmark(["--config", str(preset), "--method-options", "{ec: {lr: 0.002}}"])
    assert config.method_options == {"ec": {"lr": 0.002}}  # replaced: sahn_tiny's alpha is gone
    assert config.weights == {"ec": "/ckpt/ec"}  # not given on the command line: the preset's value
    cleared = parse_benchmark(["--config", str(preset), "--weights", "{}"])
    assert cleared.weights == {} and cleared.method_options == {"sahn_tiny": {"alpha": 0.4}, "ec": {"lr": 0.001}}


@pytest.mark.parametrize("flag, value, problem", [
    ("--method-options", "0.4", "not a mapping"),
    ("--method-options", "sahn_tiny=alpha:0.4", "not a mapping"),
    ("--train-options", "{ddnm_tiny: {steps: 400}", "neither JSON nor YAML flow style"),
    ("--method-options", "{sahn_tiny: 0.4}", "sahn_tiny: 0.4 is not a mapping"),
    ("--method-options", "{sahn_tiny:{alpha:0.4}}", "needs a space after each ':'"),
    ("--weights", "{ec: 5}", "ec: 5 is not a str | dict[str, str]"),
    ("--weights", "{ec: {celeba: [/a, /b]}}", "is not a str"),
])
def test_a_value_that_is_not_a_fitting_mapping_is_one_line_naming_the_flag_with_an_example(flag, value, problem,
                                                                                           capsys):
    with pytest.raises(SystemExit) as info:
        run_main(lambda: parse_benchmark([flag, value]))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {flag} ") and problem in err
    example = shlex.split(err.split("e.g. ")[1])  # as a shell would pass it
    assert example[0] == flag and getattr(parse_benchmark(example), flag[2:].replace("-", "_"))  # the example works


# ------------------------------------------------------------------------------------------ --help and --config
def test_help_shows_the_defaults_of_the_preset_a_run_uses_and_says_which(capsys):
    from pipelines.full_benchmark import main

    text = help_text(main, ["--help"], capsys)
    assert "--steps int, --train.steps int optimisation steps per cell" in text
    assert re.search(r"--train\.steps int [^-]*\(default: 50\)", text)  # the default preset, not the dataclass's 200
    assert re.search(r"--test-limit \[int\], --data\.test-limit \[int\] [^-]*\(default: 10\)", text)
    assert f"Defaults shown are the `default` preset's ({PRESETS / 'default.yaml'}" in text
    assert "--config paper shows and runs another preset" in text
    paper = help_text(main, ["--config", "paper", "--help"], capsys)
    assert re.search(r"--train\.steps int [^-]*\(default: 200000\)", paper)
    assert "Defaults shown are the `paper` preset's" in paper and "--config default shows and runs" in paper
    assert parse_benchmark([]).train.steps == 50  # what the help promised


@pytest.mark.parametrize("pipeline", ["ablation", "efficiency", "tune"])
def test_the_other_pipelines_help_shows_their_default_preset(pipeline, capsys):
    import importlib

    module = importlib.import_module(f"pipelines.{pipeline}")
    text = help_text(module.main, ["--help"], capsys)
    assert f"Defaults shown are the `default` preset's ({module.PRESETS / 'default.yaml'}" in text
    assert "--method-options dict" in text and "Options shown as `dict` take a mapping" in text


def test_mappings_of_the_other_pipelines_parse_from_the_command_line():
    from pipelines import efficiency, tune

    scaled = parse_config(efficiency.EfficiencyConfig, ["--step-scaling", "{ddnm: {option: steps, measure: 2}}"],
                          presets=efficiency.PRESETS, default_preset="default", description="")
    assert scaled.step_scaling == {"ddnm": {"option": "steps", "measure": 2}}
    assert scaled.image_size == 256 and scaled.throughput_batch == 2  # the rest from the efficiency preset
    fixed = parse_config(tune.TuneConfig, ["--method-options", "{teacher: tresnet_l, teacher_path: /w/asl.pth}"],
                         presets=tune.PRESETS, default_preset="default", description="")
    assert fixed.method_options == {"teacher": "tresnet_l", "teacher_path": "/w/asl.pth"}


@pytest.mark.parametrize("argv, message", [
    (["--config"], "--config needs a preset name or a YAML file"),
    (["--config", "paper", "--config", "default"], "--config given 2 times (paper, default)"),
    (["--conf", "paper"], "write --config in full"),
])
def test_config_flag_misuse_is_a_user_error(argv, message):
    with pytest.raises(UserError) as info:
        parse_benchmark(argv)
    assert message in str(info.value)


def test_config_with_an_equals_sign_and_its_aliases_select_the_preset():
    for argv in (["--config=paper"], ["--config-file", "paper"], ["--config_file", "paper"]):
        assert parse_benchmark(argv).scale == "paper"
