"""ctdiff: thin-slice CT from thick-slice scans with latent diffusion.

This package is the plain library: DICOM reading, preprocessing, the case store, models and
metrics. It never imports prefect; `tasks/` and `flows/` wrap it for orchestration.
"""

__version__ = "0.1.0"
