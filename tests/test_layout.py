import subprocess
import sys
from pathlib import Path

import ctdiff

PACKAGE = Path(ctdiff.__file__).parent


def test_library_never_imports_prefect():
    modules = sorted(f"ctdiff.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert "ctdiff.store" in modules and "ctdiff.dicom" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
