from pathlib import Path

import pytest
import yaml

from ctdiff.config import Config, ConfigError, load_config, parse_override, require_input

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["default.yaml", "demo.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(ROOT / "config" / name)
    assert isinstance(config, Config)
    # SPEC §4 keys that scripts rely on
    assert config.paths.input and config.paths.store and config.paths.work
    assert config.preprocess.window.as_pair() == [40.0, 400.0]


def test_overrides_are_parsed_as_yaml():
    config = load_config(
        None,
        ["preprocess.resolution=null", "preprocess.window=[-600, 1500]", "synth.categories=[a, b, c]",
         "paths.store=/tmp/x.zarr", "preprocess.split.seed=7"],
    )
    assert config.preprocess.resolution is None
    assert config.preprocess.window.center_hu == -600 and config.preprocess.window.width_hu == 1500
    assert config.synth.categories == ["a", "b", "c"]
    assert config.paths.store == Path("/tmp/x.zarr")
    assert config.preprocess.split.seed == 7


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"preprocess": {"resolution": 128}}))
    assert load_config(path).preprocess.resolution == 128
    assert load_config(path, ["preprocess.resolution=32"]).preprocess.resolution == 32


@pytest.mark.parametrize(
    "override, expected",
    [
        ("preprocess.resolutoin=64", "preprocess.resolutoin: unknown config key"),
        ("preprocess.resolution=big", "preprocess.resolution: Input should be a valid integer"),
        ("preprocess.window.width_hu=-5", "preprocess.window.width_hu: Input should be greater than 0"),
        ("preprocess.split.train=0.5", "split ratios must sum to 1"),
        ("nonsense", "expected dotted.key=value"),
    ],
)
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_config_file_and_input(tmp_path):
    with pytest.raises(ConfigError, match="--config: no such file"):
        load_config(tmp_path / "absent.yaml")
    config = load_config(None, [f"paths.input={tmp_path / 'nothing'}"])
    with pytest.raises(ConfigError, match="paths.input: no such folder"):
        require_input(config)


def test_parse_override_keeps_strings():
    assert parse_override("paths.input=data/cases") == (["paths", "input"], "data/cases")
    assert parse_override("a.b=3") == (["a", "b"], 3)
