"""Errors a user's data or settings can cause; each carries a reason fit for a manifest."""


class CaseError(ValueError):
    """A case cannot be ingested: corrupt, incomplete or unsupported input.

    `reason` is short, human and free of patient data (it ends up in the manifest, logs and
    Prefect artifacts), e.g. "corrupt zip", "no thin series", "missing slice at z=-120.0 mm".
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ConfigError(ValueError):
    """A config key has a wrong value or type, or names a path that does not exist."""


class UsageError(ValueError):
    """A setting or an input the user must change before the work can be done (the CLI exits 2):
    e.g. scoring a checkpoint on cases it trained on, or an empty validation split."""


class WeightsMismatch(ValueError):
    """A pretrained file does not fit the network; the message names the first mismatches."""
