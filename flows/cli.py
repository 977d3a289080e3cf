"""The `ctdiff` command: each sub-command runs the flow of the same name locally.

Without PREFECT_API_URL, Prefect starts an embedded server for the run; with it, runs are
reported to that server (and show in its UI).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ctdiff.config import Config, ConfigError, load_config, require_input

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"
EXIT_USAGE = 2

FLOW_HELP = {
    "preprocess": "DICOM cases under paths.input → case store",
    "train-vae": "train (or resume, or adopt vae.pretrained) the autoencoder",
    "encode-latents": "encode every ok case with the VAE into the latent cache",
}
DEMO_FLOWS = ("preprocess", "train-vae", "encode-latents")


def _prefect_defaults() -> None:
    # Offline machines: telemetry only logs errors; the embedded server needs time on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def _add_config_options(parser: argparse.ArgumentParser, default_config: Path | None = None) -> None:
    parser.add_argument(
        "--config", type=Path, default=default_config, metavar="FILE.yaml",
        help=f"YAML config (default: {default_config or 'built-in defaults'})",
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

    demo = commands.add_parser("demo", help="synthetic cases + " + " + ".join(DEMO_FLOWS) + " on the CPU demo config")
    _add_config_options(demo, DEMO_CONFIG)
    return parser


def _synth_overrides(args: argparse.Namespace) -> list[str]:
    keys = ("n_cases", "size", "n_thin", "thin_mm", "thick_mm", "seed", "compression")
    return [f"synth.{k}={getattr(args, k)}" for k in keys if getattr(args, k, None) is not None]


def run_synth(config: Config, out: Path) -> list[Path]:
    from ctdiff.synth import SynthSpec, synthesize

    spec = SynthSpec(**config.synth.model_dump())
    paths = synthesize(out, spec)
    print(f"wrote {len(paths)} synthetic cases to {out}")
    return paths


def run_flow(name: str, config_path: Path | None, overrides: list[str]) -> dict:
    """Run the flow called `name` in this process (embedded Prefect unless PREFECT_API_URL)."""
    _prefect_defaults()
    from flows.encode_latents import encode_latents
    from flows.preprocess import preprocess
    from flows.train_vae import train_vae

    flows = {"preprocess": preprocess, "train-vae": train_vae, "encode-latents": encode_latents}
    return flows[name](config=str(config_path) if config_path else None, overrides=overrides)


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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides = args.overrides + (_synth_overrides(args) if args.command == "synth" else [])
        config = load_config(args.config, overrides)
        if args.command == "synth":
            run_synth(config, args.out)
            return 0
        if args.command == "demo":
            input_dir = Path(config.paths.input)
            if not (input_dir.is_dir() and any(input_dir.iterdir())):
                run_synth(config, input_dir)
            else:
                print(f"using the cases already in {input_dir}")
        if args.command in ("preprocess", "demo"):
            require_input(config)
        if args.command in ("train-vae", "demo") and config.vae.pretrained is not None:
            check_pretrained(config)
    except ConfigError as error:
        print(f"ctdiff: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    names = DEMO_FLOWS if args.command == "demo" else (args.command,)
    for name in names:
        try:
            result = run_flow(name, args.config, args.overrides)
        except (RuntimeError, ValueError) as error:
            # The flow run's log above holds the details; end with one line, not a traceback.
            print(f"ctdiff: {name} failed: {error}", file=sys.stderr)
            return 1
        print_result(name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
