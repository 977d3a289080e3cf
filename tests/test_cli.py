import subprocess
import sys
import zipfile

import pytest

from flows.cli import main


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["preprocess", "--set", "preprocess.resolutoin=64"], "preprocess.resolutoin: unknown config key"),
        (["preprocess", "--set", "preprocess.resolution=big"], "preprocess.resolution: Input should be a valid integer"),
        (["preprocess", "--set", "paths.input=/no/such/folder"], "paths.input: no such folder /no/such/folder"),
        (["preprocess", "--config", "/no/such.yaml"], "--config: no such file /no/such.yaml"),
        (["synth", "OUT", "--compression", "zip"], "synth.compression: Input should be"),
    ],
)
def test_config_errors_are_one_line_with_exit_2(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ctdiff: error: ")
    assert expected in err
    assert "\n" not in err


def test_console_script_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "preprocess", "--set", f"paths.input={tmp_path / 'absent'}"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_synth_writes_category_folders(tmp_path, capsys):
    out = tmp_path / "cases"
    assert main(["synth", str(out), "--cases", "3", "--size", "16", "--n-thin", "10", "--seed", "4"]) == 0
    zips = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.zip"))
    assert zips == ["APE/case_000.zip", "APE/case_002.zip", "non-APE/case_001.zip"]
    with zipfile.ZipFile(out / "APE" / "case_000.zip") as zf:
        assert len(zf.namelist()) == (10 + 6) + 10 // 5 + 2  # thin (+ margins), thick, scout, dose SR
    assert "wrote 3 synthetic cases" in capsys.readouterr().out
