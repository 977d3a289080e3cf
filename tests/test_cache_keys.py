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


def test_case_fingerprint_reads_a_zips_directory_and_sees_any_member_change(tmp_path):
    import shutil
    import zipfile

    def zip_of(path, members):
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
        return path

    members = {"a/1.dcm": b"\x01" * 4000, "a/2.dcm": b"\x02" * 4000}
    first = zip_of(tmp_path / "1.zip", members)
    copy = shutil.copy(first, tmp_path / "copy.zip")
    assert fingerprint.case_fingerprint(first) == fingerprint.case_fingerprint(copy)  # content, not path
    same_size = zip_of(tmp_path / "2.zip", {**members, "a/2.dcm": b"\x02" * 3999 + b"\x03"})
    renamed = zip_of(tmp_path / "3.zip", {"a/1.dcm": members["a/1.dcm"], "b/2.dcm": members["a/2.dcm"]})
    keys = {fingerprint.case_fingerprint(p) for p in (first, same_size, renamed)}
    assert len(keys) == 3
    # Not a ZIP (or a damaged one), and folders: their bytes, as file_digest hashes them.
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    assert fingerprint.case_fingerprint(broken) == fingerprint.file_digest(broken)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(members["a/1.dcm"])
    assert fingerprint.case_fingerprint(folder) == fingerprint.file_digest(folder)
