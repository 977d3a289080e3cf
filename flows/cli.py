"""The `ctdiff` command: each sub-command runs the flow of the same name locally.

Without PREFECT_API_URL, Prefect starts an embedded server for the run; with it, runs are
reported to that server (and show in its UI).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from ctdiff.config import Config, ConfigError, load_config, packaged_config, require_input
from ctdiff.errors import UsageError

DEMO_CONFIG = packaged_config("demo")  # package data: found in a wheel or an image as in a checkout
EXIT_USAGE = 2

FLOW_HELP = {
    "preprocess": "DICOM cases under paths.input → case store",
    "train-vae": "train (or resume, or adopt vae.pretrained) the autoencoder",
    "encode-latents": "encode every ok case with the VAE into the latent cache",
    "train-diffusion": "train (or resume) the latent diffusion model on the latent cache",
    "evaluate": "score diffusion checkpoints against nearest/linear/cubic and the VAE ceiling",
    "pipeline": "all of the above in order, each stage reusing what is cached",
}


def _prefect_defaults() -> None:
    # Offline machines: telemetry only logs errors; the embedded server needs time on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The errors main() ends with one line (exit 1 or 2), not a traceback.
ONE_LINE_ERRORS = (RuntimeError, ValueError, OSError)
# Prefect's loggers of flow and task runs: "Encountered exception during execution" and
# "Task run failed with exception ..." carry the exception as exc_info (a traceback).
PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def _raised_by_ctdiff(error: BaseException) -> bool:
    """Whether `error` was raised in ctdiff's own code (ctdiff/, flows/, tasks/), not in a library
    it called: our own refusals are user errors; a library's RuntimeError may well be a bug."""
    if isinstance(error, (UsageError, ConfigError)):
        return True
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    path = Path(tb.tb_frame.f_code.co_filename).resolve()
    return any(path.is_relative_to(PROJECT_ROOT / top) for top in ("ctdiff", "flows", "tasks"))


class UserErrorTracebackFilter(logging.Filter):
    """Keep the message of a Prefect record whose exception is a user error ctdiff reports in one
    line (a refusal of ours: see main()), but drop its traceback; any other exception, a bug,
    keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ONE_LINE_ERRORS) and _raised_by_ctdiff(error):
            record.exc_info = None
            record.exc_text = None
        return True


def _setup_console_logging() -> None:
    """Prefect's console logging for ctdiff's commands: no tracebacks for user errors, and log
    lines that clear and redraw the progress bars instead of writing over them."""
    from tasks.progress import console_handlers, write_logs_around_bars

    for name in PREFECT_RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, UserErrorTracebackFilter) for f in logger.filters):
            logger.addFilter(UserErrorTracebackFilter())
    for handler in console_handlers():
        write_logs_around_bars(handler)


def _add_config_options(parser: argparse.ArgumentParser, default_config: Path | None = None) -> None:
    if default_config is None:
        # Not the packaged default.yaml: that file holds the full-size settings (512 px, ...) and
        # is read only when named; the built-in values are the small ones of ctdiff/config.py.
        source = "built into ctdiff/config.py (the full-size settings only with --config default)"
    else:
        source = f"the packaged {default_config.stem} config (ctdiff config show --config {default_config.stem})"
    parser.epilog = (f"defaults: {source}; override with --config FILE.yaml or a packaged name, default or "
                     "demo (keys it omits keep the built-in values), or --set key=value (applied last)")
    parser.add_argument(
        "--config", type=Path, default=default_config, metavar="FILE.yaml",
        help=f"YAML config (default: {source if default_config else 'none, built-in values'})",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set preprocess.resolution=null (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctdiff", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = commands.add_parser("synth", help="write synthetic paired DICOM cases (ZIPs) to OUT")
    synth.add_argument("out", type=Path, metavar="OUT")
    _add_config_options(synth)
    for flag, key, kind in (
        ("--cases", "n_cases", int), ("--size", "size", int), ("--n-thin", "n_thin", int),
        ("--thin-mm", "thin_mm", float), ("--thick-mm", "thick_mm", float), ("--seed", "seed", int),
        ("--compression", "compression", str),
    ):
        synth.add_argument(flag, dest=key, type=kind, default=None, help=f"synth.{key}")

    for name, help_text in FLOW_HELP.items():
        _add_config_options(commands.add_parser(name, help=help_text))

    infer = commands.add_parser("infer", help="thin slices from a thick case with a diffusion checkpoint")
    infer.add_argument("--checkpoint", type=Path, required=True, metavar="CKPT", help="a diffusion checkpoint (.pt)")
    infer.add_argument("--input", type=Path, required=True, metavar="CASE", help="ZIP, DICOM folder or .nii.gz")
    infer.add_argument(
        "--output", type=Path, required=True, metavar="OUT",
        help="OUT.nii.gz for NIfTI, else a folder for a DICOM series (with --batch: a folder of outputs)",
    )
    infer.add_argument("--batch", action="store_true", help="--input is a folder of cases; one output per case")
    infer.add_argument("--format", choices=("nifti", "dicom"), default="nifti", help="output format with --batch")
    _add_config_options(infer)

    demo = commands.add_parser("demo", help="synthetic cases + the whole pipeline on the CPU demo config")
    _add_config_options(demo, DEMO_CONFIG)

    config = commands.add_parser("config", help="show the resolved config (a starting point for your own)")
    config_actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = config_actions.add_parser(
        "show", help="print the config that --config and --set resolve to, every key, as YAML",
        description="Print the config a command would run with, every key included, as YAML: "
                    "`ctdiff config show --config default > my.yaml` starts your own.",
    )
    _add_config_options(show)

    server = commands.add_parser(
        "server", help="the local Prefect server that commands report to (started by the first one)",
        description="Without PREFECT_API_URL, the first ctdiff command starts a Prefect server in the "
                    "background (loopback, a free port; its database and log in PREFECT_HOME) and later "
                    "commands reuse it, so they start at once and its UI shows every run. "
                    "CTDIFF_SERVER=embedded asks for Prefect's temporary server per run instead.",
    )
    server.add_argument("action", choices=("start", "status", "stop"),
                        help="start it now (else the next command does), say where it is, or stop it")
    return parser


def run_server_command(action: str) -> int:
    """`ctdiff server start|status|stop`: exit 0, or 1 for `status`/`stop` when none runs."""
    from flows.local_server import LocalServer

    server = LocalServer.of_this_user()
    if action == "stop":
        stopped = server.stop()
        print("stopped the local Prefect server" if stopped else "no local Prefect server is running")
        return 0 if stopped else 1
    if action == "start":
        _prefect_defaults()
        api_url, started = server.ensure()
        server.wait(api_url)
        print(f"local Prefect server {'started' if started else 'already running'}: API {api_url}, "
              f"UI {api_url.removesuffix('/api')}")
        return 0
    state = server.state()
    if state is None:
        print(f"no local Prefect server is running (PREFECT_HOME {server.home})")
        return 1
    print(f"local Prefect server: API {state['api_url']}, UI {state['api_url'].removesuffix('/api')}, "
          f"pid {state['pid']}, log {server.log_path}")
    return 0


def show_config(config: Config, source: Path | None) -> None:
    """Every key of the resolved `config` as YAML (paths as strings), headed by where it came from."""
    import yaml

    from ctdiff.config import resolve_config_path

    origin = f"from {resolve_config_path(source)}" if source is not None else "the built-in values"
    print(f"# ctdiff config: {origin}")
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")


def _synth_overrides(args: argparse.Namespace) -> list[str]:
    keys = ("n_cases", "size", "n_thin", "thin_mm", "thick_mm", "seed", "compression")
    return [f"synth.{k}={getattr(args, k)}" for k in keys if getattr(args, k, None) is not None]


def run_synth(config: Config, out: Path) -> list[Path]:
    from ctdiff.synth import SynthSpec, synthesize

    spec = SynthSpec(**config.synth.model_dump())
    paths = synthesize(out, spec)
    print(f"wrote {len(paths)} synthetic cases to {out}")
    return paths


def check_infer_args(args: argparse.Namespace) -> None:
    """Refuse unusable `ctdiff infer` paths with a one-line UsageError naming the option, before
    the model is loaded (seconds) and long before sampling (minutes)."""
    from ctdiff.infer_io import check_input, check_output, check_output_name

    def refuse(flag: str, error: Exception) -> None:
        raise UsageError(f"{flag}: {error}") from None

    if not args.checkpoint.is_file():
        refuse("--checkpoint", ValueError(f"no such diffusion checkpoint: {args.checkpoint}"))
    try:
        check_input(args.input, args.batch)
    except ValueError as error:
        refuse("--input", error)
    try:
        if args.batch:  # a folder of outputs; each case's path is checked by infer_batch
            if args.output.suffix and not args.output.is_dir():
                raise ValueError(f"with --batch, give a folder name without a suffix, not {args.output.name!r}")
            if args.output.is_file():
                raise ValueError(f"{args.output} is a file, not a folder")
        else:
            check_output_name(args.output)
            check_output(args.output)
    except ValueError as error:
        refuse("--output", error)


def run_infer(config: Config, args: argparse.Namespace) -> int:
    """`ctdiff infer`: one case (or, with --batch, a folder of cases) through a diffusion checkpoint.

    Runs in this process without Prefect: a scan in, a thin series out, nothing to orchestrate.
    Returns the exit code: 2 for unusable arguments, 1 when a case could not be done.
    """
    from tqdm import tqdm

    from ctdiff.cases import UNCATEGORIZED, CaseRef
    from ctdiff.devices import resolve_device
    from ctdiff.infer import infer_batch, infer_entry
    from ctdiff.thin_slice import ThinSliceModel

    try:
        model = ThinSliceModel.load(args.checkpoint, resolve_device(config.infer.device))
    except ValueError as error:
        print(f"ctdiff: error: --checkpoint: {error}", file=sys.stderr)
        return EXIT_USAGE
    steps = config.infer.sample_steps or model.sample_steps
    print(
        f"model {args.checkpoint} ({model.sampler_name}, {steps} steps, {config.infer.samples} sample(s) from seed "
        f"{config.infer.seed}) "
        f"on {model.device}: {model.thick_mm:g} mm -> {model.thin_mm:g} mm",
        file=sys.stderr,
    )
    bar = tqdm(total=steps, unit="step", desc="sampling", file=sys.stderr, leave=False)

    def step_progress(step: int, total: int) -> None:
        if step == 1 and bar.n:  # the next case (--batch) starts over
            bar.reset(total)
        bar.update(step - bar.n)

    predictor = model.predictor(config.infer.seed, config.infer.sample_steps, step_progress, config.infer.samples)
    window = model.window
    try:
        if args.batch:
            results = infer_batch(
                args.input, args.output, predictor, window, model.thin_mm, args.format,
                progress=lambda info: print(f"[{info['done']}/{info['total']}] {info['id']}: {info['status']}",
                                            file=sys.stderr),
                resolution=model.resolution,
            )
        else:
            ref = CaseRef(id=args.input.name, path=str(args.input), category=UNCATEGORIZED)
            results = [infer_entry(ref, args.output, predictor, window, model.thin_mm, model.resolution)]
    except ValueError as error:
        print(f"ctdiff: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        bar.close()
    for r in results:
        if r["status"] == "ok":
            std = f" (sample std in HU: {r['std_output']})" if r.get("std_output") else ""
            if r.get("resized_from"):
                std += f" (resized in-plane from {r['resized_from'][1]}x{r['resized_from'][0]} px, as trained)"
            print(f"{r['id']}: {r['n_thick']} x {r['thick_mm']:g} mm -> {r['n_thin']} x {r['thin_mm']:g} mm "
                  f"in {r['seconds']:.1f} s: {r['output']}{std}")
        else:
            print(f"ctdiff: infer: {r['input']}: {r['reason']}", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in results) else 1


# Each command's flow, imported only when that command runs: the pipeline imports them all.
FLOW_FUNCTIONS = {
    "preprocess": ("flows.preprocess", "preprocess"), "train-vae": ("flows.train_vae", "train_vae"),
    "encode-latents": ("flows.encode_latents", "encode_latents"),
    "train-diffusion": ("flows.train_diffusion", "train_diffusion"), "evaluate": ("flows.evaluate", "evaluate"),
    "pipeline": ("flows.pipeline", "pipeline"),
}


def run_flow(name: str, config_path: Path | None, overrides: list[str]) -> dict:
    """Run the flow called `name` in this process, reporting to PREFECT_API_URL, else to the
    local background server (flows/local_server.py), started now if none runs."""
    import importlib

    from flows.local_server import use_local_server

    _prefect_defaults()
    own_server = not os.environ.get("PREFECT_API_URL")  # ours, not a team's: see below
    local = use_local_server()  # a server started now boots while the flow's imports run
    module, function = FLOW_FUNCTIONS[name]
    flow_function = getattr(importlib.import_module(module), function)
    if local is not None:
        server, api_url, started = local
        server.wait(api_url)
        if started:
            print(f"ctdiff: started a local Prefect server for this and later commands; its UI: "
                  f"{api_url.removesuffix('/api')} (`ctdiff server stop` stops it)", file=sys.stderr)
    _setup_console_logging()  # after Prefect's import has configured its logging
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    # Flow-run heartbeats serve a server's automations that mark crashed runs; ctdiff's own local
    # server has none, and each flow run would wait up to a second at its end for the heartbeat
    # thread (~5 s of a no-op demo's six flow runs). A team server (PREFECT_API_URL) keeps them.
    updates = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None} if own_server else {}
    with temporary_settings(updates=updates):
        return flow_function(config=str(config_path) if config_path else None, overrides=overrides)


def print_result(name: str, result: dict) -> None:
    if name == "preprocess":
        print_store_summary(Path(result["store"]))
        if result["previews"]:
            print(f"previews:   {Path(result['previews'][0]).parent}/ ({len(result['previews'])} PNG)")
    elif name == "train-vae":
        print(f"VAE at step {result['step']}: best val PSNR {result['best_val_psnr']:.2f} dB")
        print(f"checkpoints: {result['best']} (best), {result['last']} (last); loss curve: {result['loss_plot']}")
    elif name == "encode-latents":
        print(f"latents of {result['cases']} cases: {result['latents']} (scale factor {result['scale_factor']:.4f})")
    elif name == "train-diffusion":
        best = result["best_val_psnr"]
        fit = f": best val PSNR {best:.2f} dB" if best is not None else ""
        print(f"diffusion model at step {result['step']}{fit}")
        print(f"checkpoints: {result['best']} (best), {result['last']} (last); loss curve: {result['loss_plot']}")
    elif name == "evaluate":
        from ctdiff.evaluate import load_metrics
        from ctdiff.report import findings

        print(f"\n{result['table']}\n")
        for line in findings(load_metrics(Path(result["report_dir"]) / "metrics.json")):
            print(f"- {line}")
        print(f"\nreport: {result['report_dir']}/report.md")
    elif name == "pipeline":
        for stage, stage_result in result.items():
            print(f"\n== {stage}")
            print_result(stage, stage_result)


def print_store_summary(store_path: Path) -> None:
    from ctdiff.store import CaseStore

    manifest = CaseStore(store_path).manifest()
    header = f"{'case':<16} {'category':<10} {'split':<6} {'status':<12} {'thick':>5} {'thin':>5}  reason"
    print(header)
    print("-" * len(header))
    for e in manifest:
        print(
            f"{e['id']:<16} {e['category']:<10} {e['split'] or '-':<6} {e['status']:<12} "
            f"{e['n_thick']:>5} {e['n_thin']:>5}  {e['reason'] or ''}"
        )
    print(f"\ncase store: {store_path}")


def check_pretrained(config: Config) -> None:
    """Refuse, before any flow starts, weights that do not fit `vae.preset`."""
    from ctdiff.autoencoder import CtAutoencoder
    from ctdiff.pretrained import WeightsMismatch, load_pretrained

    try:
        load_pretrained(CtAutoencoder(config.vae.preset).net, config.vae.pretrained, config.vae.allow_partial)
    except WeightsMismatch as error:
        raise ConfigError(f"vae.pretrained: {error}") from None


def require_writable_paths(config: Config) -> None:
    """Refuse, before any flow starts, a case store or work folder that is read-only or full."""
    from ctdiff.store import UnwritableError, require_writable

    try:
        require_writable(config.paths.store, "the case store")
        require_writable(config.paths.work, "the work folder")
    except UnwritableError as error:
        raise ConfigError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "server":
        try:
            return run_server_command(args.action)
        except RuntimeError as error:  # it would not start: the message names its log
            print(f"ctdiff: server: error: {error}", file=sys.stderr)
            return 1
    try:
        overrides = args.overrides + (_synth_overrides(args) if args.command == "synth" else [])
        config = load_config(args.config, overrides)
        if args.command == "synth":
            run_synth(config, args.out)
            return 0
        if args.command == "config":
            show_config(config, args.config)
            return 0
        if args.command == "infer":
            check_infer_args(args)
            return run_infer(config, args)
        if args.command == "demo":
            input_dir = Path(config.paths.input)
            if not (input_dir.is_dir() and any(input_dir.iterdir())):
                run_synth(config, input_dir)
            else:
                print(f"using the cases already in {input_dir}")
        if args.command in ("preprocess", "pipeline", "demo"):
            require_input(config)
            require_writable_paths(config)
        if args.command in ("train-vae", "pipeline", "demo") and config.vae.pretrained is not None:
            check_pretrained(config)
    except (ConfigError, UsageError) as error:
        print(f"ctdiff: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    name = "pipeline" if args.command == "demo" else args.command
    try:
        result = run_flow(name, args.config, args.overrides)
    except UsageError as error:  # a setting or input to change: a usage error, as for a bad key
        print(f"ctdiff: {name}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (RuntimeError, ValueError, OSError) as error:
        # The flow run's log above holds the details; end with one line, not a traceback.
        print(f"ctdiff: {name} failed: {error}", file=sys.stderr)
        return 1
    print_result(name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
