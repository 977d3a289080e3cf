"""Typed configuration: YAML files plus `dotted.key=value` overrides, validated once at the edge.

Every section forbids unknown keys, so a typo is an error rather than a silently ignored
setting. Relative paths are resolved against the working directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ctdiff.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(_Section):
    input: Path = Path("data/cases")  # folder of cases: <category>/<case>.zip or folders
    store: Path = Path("data/store.zarr")  # the case store (one per preprocessing config)
    work: Path = Path("data/work")  # checkpoints, latents, reports


class WindowConfig(_Section):
    center_hu: float = 40.0
    width_hu: float = Field(400.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _from_pair(cls, value: Any) -> Any:
        # Accept the compact form `window: [center, width]` used on the command line.
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError("window must be [center_hu, width_hu]")
            return {"center_hu": value[0], "width_hu": value[1]}
        return value

    def as_pair(self) -> list[float]:
        return [self.center_hu, self.width_hu]


class SplitConfig(_Section):
    train: float = Field(0.8, ge=0)
    val: float = Field(0.1, ge=0)
    test: float = Field(0.1, ge=0)
    seed: int = 0  # changes which cases land in which split, deterministically

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"split ratios must sum to 1, got {total:g}")
        return self


class DaskConfig(_Section):
    address: str | None = None  # an existing scheduler (tcp://host:8786); null starts a LocalCluster
    n_workers: int = Field(2, ge=1)  # LocalCluster (or KubeCluster) size; a worker decodes one case at a time
    memory_limit: str = "4GiB"  # per worker; a case needs ~3x its raw HU size
    # Inside a ctdiff Kubernetes pod: start a KubeCluster of n_workers pods (dask-kubernetes
    # operator) with the pod's image and data volume, removed when the flow ends.
    kubernetes: bool = False

    @model_validator(mode="after")
    def _one_cluster(self) -> "DaskConfig":
        if self.address and self.kubernetes:
            raise ValueError("set either address (an existing scheduler) or kubernetes: true, not both")
        return self


class PreprocessConfig(_Section):
    resolution: int | None = Field(256, ge=8)  # in-plane pixels after resize; null keeps the native grid
    window: WindowConfig = WindowConfig()  # applied on read, never baked into the store
    chunk_slices: int = Field(8, ge=1)  # Zarr chunk depth: small enough for random depth windows
    compression_level: int = Field(1, ge=1, le=9)  # Blosc lz4 level (bitshuffled int16: zstd is 12% smaller, 3x slower)
    retries: int = Field(2, ge=0)  # for transient I/O errors only; bad data is quarantined at once
    retry_delay_s: float = Field(2.0, ge=0)
    split: SplitConfig = SplitConfig()
    dask: DaskConfig = DaskConfig()


class SynthConfig(_Section):
    n_cases: int = Field(6, ge=1)
    size: int = Field(64, ge=16)  # in-plane pixels
    n_thin: int = Field(60, ge=5)  # thin slices over the thick series' extent
    thin_mm: float = Field(1.0, gt=0)
    thick_mm: float = Field(5.0, gt=0)
    categories: list[str] = ["APE", "non-APE"]
    seed: int = 0
    compression: Literal["none", "deflate", "rle", "jpeg2000"] = "none"


class VaeConfig(_Section):
    preset: Literal[
        "maisi-ct", "maisi-tiny", "slice-kl", "slice-kl-tiny", "slice-kl-4x", "slice-kl-4x-tiny", "slice-kl-2x-tiny",
    ] = "slice-kl"
    pretrained: Path | None = None  # local weights to adopt, e.g. NVIDIA MAISI's autoencoder.pt
    allow_partial: bool = False  # load what fits and train the rest, instead of refusing
    num_splits: int = Field(1, ge=1)  # maisi only: split convolutions along one axis to bound memory


class TrainVaeConfig(_Section):
    steps: int = Field(20000, ge=0)  # 0 adopts vae.pretrained as it is
    batch_size: int = Field(4, ge=1)
    patch_slices: int = Field(16, ge=1)  # patch depth; a multiple of the preset's depth factor
    patch_size: int = Field(128, ge=8)  # patch height and width, a multiple of the in-plane factor
    lr: float = Field(1e-4, gt=0)
    kl_weight: float = Field(1e-6, ge=0)  # small: latents stay informative, just regularised
    adversarial_weight: float = Field(0.0, ge=0)  # PatchGAN (least squares); 0 turns it off
    adversarial_start: int = Field(2000, ge=0)  # steps of plain reconstruction before the GAN joins
    val_every: int = Field(500, ge=1)
    val_cases: int = Field(4, ge=1)  # val-split cases reconstructed for PSNR/SSIM
    # Validation picks best.pt, so it must not see the training cases; `train` is an explicit
    # opt-in (e.g. too few cases for a val split), recorded in every checkpoint's "data".
    validate_on: Literal["val", "train"] = "val"
    checkpoint_every: int = Field(500, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    device: str = "auto"  # auto: cuda if present, else cpu
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    grad_checkpointing: bool | None = None  # null: on for CUDA, off on CPU
    # DDP processes, started with torchrun (ctdiff.distributed); null = one per visible GPU, 1 on CPU
    processes: int | None = Field(None, ge=1)
    # How long DDP ranks wait at a barrier (rank 0 validates whole cases meanwhile) or for each
    # other's gradients before the run fails instead of hanging; NCCL's own default is 10 min.
    ddp_timeout_min: float = Field(30.0, gt=0)


class EncodeConfig(_Section):
    checkpoint: str = "best"  # best | last | a path to a VAE checkpoint
    chunk_slices: int = Field(64, ge=1)  # depth of the chunks a volume is encoded in (bounds memory)
    device: str = "auto"


class DiffusionConfig(_Section):
    preset: Literal["tiny", "small", "full"] = "full"  # DiffusionModelUNet size: tiny/small for the CPU
    sampler: Literal["ddim", "rflow"] = "rflow"  # DDPM-trained + DDIM sampling, or rectified flow
    prediction: Literal["epsilon", "v_prediction"] = "v_prediction"  # ddim only; rflow predicts velocity
    train_timesteps: int = Field(1000, ge=2)  # training noise levels (DDPM) / time discretisation (rflow)
    sample_steps: int = Field(20, ge=1)  # DDIM steps or Euler steps at inference
    min_snr_gamma: float | None = Field(5.0, gt=0)  # ddim only: min-SNR-γ loss weights; null = plain MSE
    window_slices: int = Field(32, ge=1)  # thin latent slices seen at once (training and inference)
    overlap_slices: int = Field(8, ge=0)  # inference: latent slices shared by neighbouring windows
    # What the model generates (ctdiff.residual): the residual over this classical z-interpolation
    # of the thick slices (output = base + decoded residual), or `none`: the whole thin volume.
    base: Literal["cubic", "linear", "none"] = "cubic"
    # Move each sample so its thin slices average to the measured thick slab (ctdiff.slab); it
    # assumes box-shaped slabs, as the synthetic cases have and real scanners do not.
    slab_consistency: bool = False


class TrainDiffusionConfig(_Section):
    steps: int = Field(20000, ge=0)
    batch_size: int = Field(2, ge=1)
    latent_patch: int | None = Field(None, ge=4)  # in-plane crop of the latents; null = whole slices
    lr: float = Field(1e-4, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)  # EMA weights are what validation, best.pt and infer use
    grad_clip: float = Field(1.0, gt=0)
    val_every: int = Field(1000, ge=1)
    val_cases: int = Field(2, ge=1)  # val-split cases sampled in full for PSNR/SSIM
    # Validation picks best.pt, so it must not see the training cases; `train` is an explicit
    # opt-in (e.g. too few cases for a val split), recorded in every checkpoint's "data".
    validate_on: Literal["val", "train"] = "val"
    checkpoint_every: int = Field(500, ge=1)
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    # DDP processes, started with torchrun (ctdiff.distributed); null = one per visible GPU, 1 on CPU
    processes: int | None = Field(None, ge=1)
    # How long DDP ranks wait at a barrier (rank 0 validates whole cases meanwhile) or for each
    # other's gradients before the run fails instead of hanging; NCCL's own default is 10 min.
    ddp_timeout_min: float = Field(30.0, gt=0)


class EvaluateConfig(_Section):
    checkpoints: list[str] = []  # diffusion checkpoints to score; empty = the one `checkpoint` picks
    # best | last (best.pt / last.pt under checkpoints/diffusion, as infer's) | newest (most
    # recently written *.pt) | a path. best: the one `ctdiff infer` examples use.
    checkpoint: str = "best"
    split: Literal["train", "val", "test"] = "test"
    cases: list[str] | None = None  # named cases instead of a split
    seed: int = 0  # sampling noise: the same checkpoint and seed give the same numbers
    samples: int = Field(4, ge=1)  # K: samples (seeds seed..seed+K-1) averaged into the prediction
    device: str = "auto"


class InferConfig(_Section):
    seed: int = 0
    samples: int = Field(4, ge=1)  # K: averaged into the output; their std is written beside it
    device: str = "auto"
    sample_steps: int | None = Field(None, ge=1)  # null: the checkpoint's diffusion.sample_steps
    # The `infer` flow (deployments); `ctdiff infer` takes these as --checkpoint/--input/--output.
    checkpoint: str = "best"  # best | last (under checkpoints/diffusion) | a path
    input: Path | None = None  # a folder of cases (ZIPs, DICOM folders, .nii/.nii.gz)
    output: Path | None = None  # a folder: <case>.nii.gz or <case>/ (DICOM) per case
    format: Literal["nifti", "dicom"] = "nifti"


class Config(_Section):
    paths: PathsConfig = PathsConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    synth: SynthConfig = SynthConfig()
    vae: VaeConfig = VaeConfig()
    train_vae: TrainVaeConfig = TrainVaeConfig()
    encode: EncodeConfig = EncodeConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train_diffusion: TrainDiffusionConfig = TrainDiffusionConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    infer: InferConfig = InferConfig()


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML: null, numbers, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return [part.strip() for part in key.strip().split(".")], value


def _set_dotted(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(keys[: i + 1])}: is a value, cannot set {'.'.join(keys)}")
        node = child
    node[keys[-1]] = value


def _format_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{key}: unknown config key in {source}; check its spelling (see config/default.yaml)"
    got = first.get("input")
    got_text = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {first['msg']}{got_text}; fix it in {source} or with --set {key}=..."


# The configs shipped with the package (ctdiff/configs/NAME.yaml), found by name in any install.
PACKAGED_CONFIGS = ("default", "demo")


def packaged_config(name: str) -> Path:
    """The file of a config that ships with ctdiff: "default" (full-size) or "demo" (CPU demo)."""
    if name not in PACKAGED_CONFIGS:
        raise ConfigError(f"--config: no packaged config {name!r}; packaged: {', '.join(PACKAGED_CONFIGS)}")
    # A package installed as files (wheel, editable, image): the resource is a real path.
    return Path(str(resources.files("ctdiff.configs") / f"{name}.yaml"))


def resolve_config_path(path: str | Path) -> Path:
    """A config file, or for a bare packaged name ("default", "demo") that is not a file here,
    the packaged config of that name."""
    path = Path(path)
    if not path.is_file() and str(path) in PACKAGED_CONFIGS:
        return packaged_config(str(path))
    if not path.is_file():
        raise ConfigError(f"--config: no such file {path}")
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (a file, or a packaged config's name), or the built-in defaults, apply
    overrides, validate; raise ConfigError."""
    tree: dict = {}
    source = "the defaults"
    if path is not None:
        path = resolve_config_path(path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"--config: {path} is not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config: {path} must hold a mapping of sections")
        source = str(path)
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(tree, keys, value)
    if overrides:
        source += " / --set"
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc, source)) from None


def require_input(config: Config) -> Path:
    """The input folder, or a ConfigError naming paths.input."""
    folder = Path(config.paths.input)
    if not folder.is_dir():
        raise ConfigError(f"paths.input: no such folder {folder}; set it with --set paths.input=DIR")
    return folder
