"""Build blt_ext._C with CMake + Ninja against the torch that runs this script.

CUDA sources are compiled when torch was built with CUDA and an nvcc is found under
CUDA_HOME (or on PATH); that is decided from the installation, never from a live GPU.
Environment: BLT_EXT_CUDA=0|1 forces the choice, TORCH_CUDA_ARCH_LIST picks the GPU
architectures (default 9.0), MAX_JOBS caps parallel compile jobs, BLT_EXT_BUILD_TYPE
selects the CMake build type (default Release).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def want_cuda(torch):
    forced = os.environ.get("BLT_EXT_CUDA")
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"BLT_EXT_CUDA must be 0 or 1, got {forced!r}")
    has_cuda_torch = torch.version.cuda is not None
    nvcc = find_nvcc()
    if forced == "1":
        if not has_cuda_torch:
            raise SystemExit(f"BLT_EXT_CUDA=1 but torch {torch.__version__} was built without CUDA")
        if nvcc is None:
            raise SystemExit("BLT_EXT_CUDA=1 but no nvcc was found under CUDA_HOME or on PATH")
        return nvcc
    if forced == "0":
        return None
    return nvcc if (has_cuda_torch and nvcc) else None


def cuda_architectures():
    """TORCH_CUDA_ARCH_LIST ("9.0", "8.0;9.0a", "9.0+PTX") -> CMAKE_CUDA_ARCHITECTURES."""
    archs = []
    for item in os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0").replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        item = item.removesuffix("+PTX")
        arch = item.replace(".", "")
        archs.append(arch if not ptx else f"{arch}-real;{arch}-virtual")
    return ";".join(archs)


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # A fixed build folder per Python/torch pair keeps rebuilds incremental.
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
        build_dir = ROOT / "build" / f"cmake-{tag}"
        build_dir.mkdir(parents=True, exist_ok=True)
        nvcc = want_cuda(torch)
        args = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('BLT_EXT_BUILD_TYPE', 'Release')}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DBLT_EXT_CUDA={'ON' if nvcc else 'OFF'}",
        ]
        if nvcc:
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_CUDA_ARCHITECTURES={cuda_architectures()}"]
        subprocess.run(args, check=True)
        build = ["cmake", "--build", str(build_dir)]
        if os.environ.get("MAX_JOBS"):
            build += ["--parallel", os.environ["MAX_JOBS"]]
        subprocess.run(build, check=True)
        write_build_info(torch, nvcc)


def write_build_info(torch, nvcc):
    info = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "with_cuda": nvcc is not None,
        "cuda_architectures": cuda_architectures() if nvcc else "",
    }
    lines = ['"""Written by setup.py at build time: what this build of blt_ext._C was compiled against."""', ""]
    lines += [f"{key.upper()} = {value!r}" for key, value in info.items()]
    (ROOT / "blt_ext" / "_build_info.py").write_text("\n".join(lines) + "\n")


setup(ext_modules=[Extension("blt_ext._C", sources=[])], cmdclass={"build_ext": CMakeBuild})
