"""Importing blt_ext: a clear error when the compiled library does not fit the running torch."""

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def import_with_build_info(build_info_source):
    """Import blt_ext in a fresh interpreter whose blt_ext._build_info is replaced."""
    code = textwrap.dedent(f"""
        import sys, types
        info = {build_info_source}
        sys.modules["blt_ext._build_info"] = info
        try:
            import blt_ext
        except ImportError as exc:
            print("ImportError:", exc)
        else:
            print("imported")
    """)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout


def test_import_names_both_torch_versions_on_a_mismatch():
    out = import_with_build_info(
        "types.SimpleNamespace(TORCH_VERSION='1.0.0', TORCH_CUDA=None, WITH_CUDA=False)"
    )
    assert "ImportError: blt_ext._C was built against torch 1.0.0" in out
    assert f"but torch {torch.__version__} is imported" in out
    assert "pip install --no-build-isolation -e ." in out


def test_import_explains_an_unbuilt_checkout():
    out = import_with_build_info("None")
    assert "ImportError: blt_ext is not built" in out


def test_import_succeeds_with_the_real_build_info():
    from blt_ext import _build_info

    source = (f"types.SimpleNamespace(TORCH_VERSION={_build_info.TORCH_VERSION!r}, "
              f"TORCH_CUDA={_build_info.TORCH_CUDA!r}, WITH_CUDA={_build_info.WITH_CUDA!r})")
    assert import_with_build_info(source).strip() == "imported"
