"""Cache keys cover the code of every ctdiff module a result depends on (its import closure)."""

import pytest

from ctdiff import fingerprint


@pytest.fixture
def edit(monkeypatch):
    """edit(name): the key functions now read module `name` with a trailing comment added."""
    source = fingerprint._source

    def apply(name: str) -> None:
        monkeypatch.setattr(fingerprint, "_source", lambda n: source(n) + (b"\n# edited\n" if n == name else b""))

    return apply


def test_the_closure_follows_imports_at_any_depth_and_inside_functions():
    closure = fingerprint.import_closure("ctdiff.train_diffusion")
    # thin_slice -> latents -> windowing; the training loop; interpolation through residual.
    for name in ("ctdiff.thin_slice", "ctdiff.latents", "ctdiff.windowing", "ctdiff.interpolate", "ctdiff.sliding"):
        assert name in closure
    assert "ctdiff.dicom" not in closure and "ctdiff.phantom" not in closure
    # ctdiff.preprocess imports the store inside a function; the store's lazy LatentStore
    # re-export (module __getattr__) computes nothing and is not followed.
    assert "ctdiff.store" in fingerprint.import_closure("ctdiff.preprocess")
    assert "ctdiff.latents" not in fingerprint.import_closure("ctdiff.store")


@pytest.mark.parametrize(
    "root, edited, changes",
    [
        ("ctdiff.train_diffusion", "ctdiff.windowing", True),
        ("ctdiff.train_diffusion", "ctdiff.interpolate", True),
        ("ctdiff.train_diffusion", "ctdiff.dicom", False),
        ("ctdiff.train_vae", "ctdiff.autoencoder", True),
        ("ctdiff.train_vae", "ctdiff.samplers", False),
        ("tasks.evaluate", "ctdiff.samplers", True),
        ("tasks.evaluate", "ctdiff.latents", True),
        ("tasks.evaluate", "ctdiff.phantom", False),
        ("tasks.infer", "ctdiff.samplers", True),
        ("tasks.infer", "ctdiff.diffusion", True),
        ("tasks.infer", "ctdiff.phantom", False),
    ],
)
def test_editing_a_module_changes_exactly_the_keys_that_depend_on_it(edit, root, edited, changes):
    before = fingerprint.code_version(root)
    edit(edited)
    assert (fingerprint.code_version(root) != before) is changes
