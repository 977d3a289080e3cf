"""The tiny pipeline settings the end-to-end flow tests share: seconds per stage on the CPU."""

from pathlib import Path

import yaml


def tiny_pipeline_config(root: Path, split: dict[str, float]) -> Path:
    """A config file under `root` running every stage on `root/cases` with tiny models."""
    config = {
        "paths": {"input": str(root / "cases"), "store": str(root / "store.zarr"), "work": str(root / "work")},
        "preprocess": {"resolution": None, "split": {**split, "seed": 0}, "dask": {"n_workers": 1}},
        "vae": {"preset": "slice-kl-tiny"},
        "train_vae": {"steps": 6, "batch_size": 2, "patch_slices": 4, "patch_size": 32, "val_every": 6,
                      "val_cases": 1, "checkpoint_every": 6, "device": "cpu"},
        "encode": {"device": "cpu"},
        "diffusion": {"preset": "tiny", "window_slices": 8, "overlap_slices": 2, "sample_steps": 2},
        "train_diffusion": {"steps": 4, "batch_size": 2, "val_every": 4, "val_cases": 1,
                            "checkpoint_every": 4, "device": "cpu"},
        "evaluate": {"device": "cpu"},
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
