import numpy as np
from PIL import Image

from ctdiff.figures import case_preview
from ctdiff.store import CaseStore
from ctdiff.volume import Volume


def test_preview_is_drawn_once_per_case_and_window(tmp_path):
    store = CaseStore(tmp_path / "s.zarr")
    store.create()
    z = np.arange(20.0)
    thin = Volume(hu=np.full((20, 16, 16), -1000, np.int16), spacing_mm=(1.0, 2.0, 2.0), z_mm=z)
    thick = Volume(hu=np.full((4, 16, 16), 40, np.int16), spacing_mm=(5.0, 2.0, 2.0), z_mm=z[2::5])
    store.write_native("c", {"thick": thick, "thin": thin}, "n", {}, 4, 1)
    store.write_case("c", {}, "k", {"id": "c", "status": "ok", "reason": None}, 4, 1)
    out = tmp_path / "previews" / "c.png"
    case_preview(store, "c", 40, 400, out)
    first = out.stat().st_mtime_ns
    with Image.open(out) as image:
        assert image.size[0] > 3 * image.size[1]  # four panels side by side
    case_preview(store, "c", 40, 400, out)
    assert out.stat().st_mtime_ns == first  # same case and window: kept
    case_preview(store, "c", -600, 1500, out)
    assert out.stat().st_mtime_ns != first  # a new window is a new picture
