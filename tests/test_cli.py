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


def _one_line(err: str) -> str:
    err = err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.fixture
def infer_paths(tmp_path, monkeypatch):
    """A checkpoint and an input that exist; loading the model is an error: every refusal below
    must come before it."""
    from ctdiff.thin_slice import ThinSliceModel

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(ThinSliceModel, "load", no_load)
    (tmp_path / "model.pt").write_bytes(b"")
    (tmp_path / "case.zip").write_bytes(b"")
    (tmp_path / "cases").mkdir()
    return tmp_path


@pytest.mark.parametrize("name", ["out.txt", "out.png", "out.dcm", "out.zip"])
def test_infer_refuses_an_output_that_is_neither_nifti_nor_a_folder(infer_paths, capsys, name):
    d = infer_paths
    argv = ["infer", "--checkpoint", str(d / "model.pt"), "--input", str(d / "case.zip"), "--output", str(d / name)]
    assert main(argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert err == (f"ctdiff: error: --output: cannot write {name!r}: give OUT.nii or OUT.nii.gz for NIfTI, "
                   "or a folder name without a suffix for a DICOM series")
    assert not (d / name).exists()


@pytest.mark.parametrize("argv, expected", [
    (["--input", "{d}/absent.zip", "--output", "{d}/o.nii.gz"], "--input: no such file or folder {d}/absent.zip"),
    (["--input", "{d}/model.pt", "--output", "{d}/o.nii.gz"],
     "--input: {d}/model.pt: give a case ZIP, a DICOM folder or a .nii/.nii.gz file"),
    (["--input", "{d}/cases", "--output", "{d}/o.nii.gz", "--batch"], "--output: with --batch, give a folder name "
                                                                       "without a suffix, not 'o.nii.gz'"),
    (["--input", "{d}/absent", "--output", "{d}/o", "--batch"], "--input: no such folder {d}/absent"),
    (["--input", "{d}/case.zip", "--output", "{d}/o", "--batch"], "--input: {d}/case.zip is not a folder of cases"),
])
def test_infer_checks_its_arguments_before_loading_the_model(infer_paths, capsys, argv, expected):
    d = infer_paths
    argv = [a.format(d=d) for a in argv]
    assert main(["infer", "--checkpoint", str(d / "model.pt"), *argv]) == 2
    assert _one_line(capsys.readouterr().err) == f"ctdiff: error: {expected.format(d=d)}"


def test_infer_refuses_a_missing_checkpoint_first(infer_paths, capsys):
    d = infer_paths
    assert main(["infer", "--checkpoint", str(d / "none.pt"), "--input", str(d / "absent"), "--output", "x.txt"]) == 2
    assert _one_line(capsys.readouterr().err) == f"ctdiff: error: --checkpoint: no such diffusion checkpoint: {d}/none.pt"


@pytest.mark.parametrize("command", ["preprocess", "train-vae", "encode-latents", "train-diffusion", "evaluate",
                                     "pipeline", "infer", "synth"])
def test_help_says_where_the_defaults_come_from(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert ("defaults: built into ctdiff/config.py (the full-size settings only with --config default); "
            "override with --config FILE.yaml or a packaged name, default or demo") in out
    assert "--set key=value" in out


def test_demo_help_names_its_config(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert ("defaults: the packaged demo config (ctdiff config show --config demo); "
            "override with --config FILE.yaml") in out


def test_evaluate_scores_best_pt_by_default_as_infer_does(tmp_path):
    import os

    from ctdiff.config import load_config
    from ctdiff.layout import WorkLayout
    from tasks.evaluate import checkpoint_paths

    config = load_config(None, [f"paths.work={tmp_path}"])
    folder = WorkLayout.of(config).checkpoint_dir("diffusion")
    with pytest.raises(ValueError, match=r"^evaluate.checkpoint: no diffusion checkpoint .*best\.pt; run"):
        checkpoint_paths(config)
    folder.mkdir(parents=True)
    for name, mtime in (("best.pt", 1), ("last.pt", 2)):  # last.pt is the newest
        (folder / name).write_bytes(b"")
        os.utime(folder / name, (mtime, mtime))
    assert checkpoint_paths(config) == [str(folder / "best.pt")]
    assert checkpoint_paths(load_config(None, [f"paths.work={tmp_path}", "evaluate.checkpoint=newest"])) == [
        str(folder / "last.pt")]
    assert checkpoint_paths(load_config(None, [f"paths.work={tmp_path}", "evaluate.checkpoint=last"])) == [
        str(folder / "last.pt")]
    named = load_config(None, [f"paths.work={tmp_path}", "evaluate.checkpoints=[a.pt]"])
    assert checkpoint_paths(named) == ["a.pt"]


def test_preprocess_of_only_broken_cases_ends_in_one_line_without_a_traceback(tmp_path, prefect_harness, capfd,
                                                                              caplog):
    """A user error (no case could be ingested) shows Prefect's log lines and ctdiff's one line, no
    traceback: neither Prefect's "Encountered exception during execution" nor ctdiff's."""
    import numpy as np

    cases = tmp_path / "in"
    cases.mkdir()
    rng = np.random.default_rng(0)
    for name in ("one", "two"):
        (cases / f"{name}.zip").write_bytes(rng.bytes(2048))
    code = main([
        "preprocess", "--set", f"paths.input={cases}", "--set", f"paths.store={tmp_path / 'store.zarr'}",
        "--set", f"paths.work={tmp_path / 'work'}", "--set", "preprocess.dask.n_workers=1",
        "--set", "preprocess.retries=0",
    ])
    err = capfd.readouterr().err
    assert code == 1, err
    assert err.strip().splitlines()[-1] == (
        "ctdiff: preprocess failed: no case could be ingested (2 quarantined); see the manifest"
    ), err
    assert "Traceback" not in err, err
    # Prefect's console handler writes to the stderr Prefect was first imported with, which in a
    # test session may not be the one captured here: check its records too (message kept).
    assert "Encountered exception during execution: RuntimeError('no case could be ingested" in caplog.text
    assert "Traceback" not in caplog.text, caplog.text


def _record_of(error_factory) -> "logging.LogRecord":
    import logging

    try:
        error_factory()
    except Exception:  # noqa: BLE001
        return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "Encountered exception during "
                                 "execution: %r", (None,), sys.exc_info())
    raise AssertionError("no error")


def test_prefect_keeps_the_traceback_of_a_bug_but_not_of_a_user_error():
    from ctdiff.config import load_config
    from ctdiff.errors import UsageError
    from flows.cli import UserErrorTracebackFilter

    def usage_error():
        raise UsageError("pick another split")

    def bug():
        return {}["missing"]

    def library_value_error():  # raised in a library (here the interpreter), not by ctdiff
        return int("not a number")

    user = _record_of(usage_error)
    ours = _record_of(lambda: load_config(None, ["preprocess.resolutoin=64"]))  # ConfigError in ctdiff/
    assert UserErrorTracebackFilter().filter(user) and user.exc_info is None
    assert UserErrorTracebackFilter().filter(ours) and ours.exc_info is None
    for record in (_record_of(bug), _record_of(library_value_error)):
        assert UserErrorTracebackFilter().filter(record) and record.exc_info is not None


@pytest.mark.parametrize("api_url, expected", [(None, None), ("http://prefect.example:4200/api", 180)])
def test_flow_run_heartbeats_only_for_a_team_server(monkeypatch, api_url, expected):
    """ctdiff's own server has no automation to read heartbeats, and each flow run waits for its
    heartbeat thread at its end; a server named by PREFECT_API_URL keeps them."""
    import flows.cli
    import flows.train_vae

    def probe(config, overrides):
        from prefect.settings import get_current_settings

        return get_current_settings().flows.heartbeat_frequency

    monkeypatch.delenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", raising=False)
    if api_url is None:
        monkeypatch.delenv("PREFECT_API_URL", raising=False)
    else:
        monkeypatch.setenv("PREFECT_API_URL", api_url)
    monkeypatch.setattr(flows.train_vae, "probe", probe, raising=False)
    monkeypatch.setitem(flows.cli.FLOW_FUNCTIONS, "probe", ("flows.train_vae", "probe"))
    assert flows.cli.run_flow("probe", None, []) == expected
