import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctdiff.config import (
    PACKAGED_CONFIGS, Config, ConfigError, load_config, packaged_config, parse_override, require_input,
)
from flows.cli import main

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


@pytest.mark.parametrize("name", PACKAGED_CONFIGS)
def test_packaged_configs_are_the_files_config_links_to(name):
    packaged = packaged_config(name)
    assert packaged.parent.name == "configs" and packaged.parent.parent.name == "ctdiff"
    assert (ROOT / "config" / f"{name}.yaml").resolve() == packaged.resolve()
    # By name, from any folder: the same config as the file.
    assert load_config(name) == load_config(packaged)


def test_an_unknown_config_name_is_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="no such file small"):
        load_config("small")


def test_a_file_beats_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("paths: {store: mine.zarr}\n")
    assert load_config("demo").paths.store == Path("mine.zarr")


def test_config_show_prints_a_config_that_loads_back_the_same(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "show", "--config", "demo", "--set", "train_vae.steps=7"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(f"# ctdiff config: from {packaged_config('demo')}\n")
    (tmp_path / "mine.yaml").write_text(shown)
    assert load_config(tmp_path / "mine.yaml") == load_config("demo", ["train_vae.steps=7"])
    assert load_config(tmp_path / "mine.yaml").train_vae.steps == 7


def test_config_show_of_a_missing_file_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "show", "--config", "nope.yaml"]) == 2
    assert capsys.readouterr().err.strip() == "ctdiff: error: --config: no such file nope.yaml"


def test_the_wheel_carries_the_configs(tmp_path):
    """A non-editable install (a wheel, as in the image) finds its configs: `ctdiff demo`'s
    default and `--config default` do not depend on the source tree."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(ROOT)], check=True, capture_output=True)
    (wheel,) = wheels.glob("ctdiff-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shown = subprocess.run(
        [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main(sys.argv[1:]))",
         "config", "show", "--config", "demo"],
        cwd=elsewhere, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True, check=True,
    ).stdout
    assert shown.startswith(f"# ctdiff config: from {site / 'ctdiff' / 'configs' / 'demo.yaml'}\n")
    assert yaml.safe_load(shown) == load_config("demo").model_dump(mode="json")
