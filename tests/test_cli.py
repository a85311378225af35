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
