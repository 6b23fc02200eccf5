"""Build of the native extension layerskip_ext._C with CMake (metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .        # or `.`; `pip wheel --no-build-isolation --no-deps .`

Environment:
  LAYERSKIP_CUDA=0|1      force CPU-only / require CUDA (default: CUDA when torch is a CUDA build and nvcc exists)
  TORCH_CUDA_ARCH_LIST    CUDA archs (default "8.0;9.0")
  CUDA_HOME / CUDA_PATH   CUDA toolkit root (default: /usr/local/cuda, else the nvcc on PATH)
  MAX_JOBS / CMAKE_BUILD_PARALLEL_LEVEL   build parallelism
  LAYERSKIP_BUILD_TYPE    CMake build type (default Release)
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path = ROOT) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = os.fspath(sourcedir)


def _log(msg: str) -> None:
    print(f"[layerskip_ext build] {msg}", file=sys.stderr, flush=True)


def _env_flag(name: str) -> str | None:
    """'0' / '1' / None for an on/off environment variable."""
    v = os.environ.get(name)
    if v is None or v.strip() == "":
        return None
    return "0" if v.strip().lower() in ("0", "off", "false", "no") else "1"


def _find_cuda_home() -> Path | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            p = Path(os.environ[var])
            if (p / "bin" / "nvcc").exists():
                return p
    default = Path("/usr/local/cuda")
    if (default / "bin" / "nvcc").exists():
        return default
    nvcc = shutil.which("nvcc")
    if nvcc:
        return Path(nvcc).resolve().parent.parent
    return None


def _nvcc_version(cuda_home: Path) -> tuple[int, int] | None:
    try:
        out = subprocess.run([str(cuda_home / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _nvidia_pip_roots() -> list[Path]:
    """Folders of the nvidia-* pip packages torch depends on (site-packages/nvidia/...)."""
    try:
        import nvidia  # namespace package installed with CUDA builds of torch
    except ImportError:
        return []
    roots = []
    for base in getattr(nvidia, "__path__", []):
        roots.extend(sorted(p for p in Path(base).iterdir() if p.is_dir()))
    return roots


def _cuda_cmake_args(cuda_home: Path) -> list[str]:
    args = [
        f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
        f"-DCUDAToolkit_ROOT={cuda_home}",
        f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}",
    ]
    roots = _nvidia_pip_roots()
    # torch's CMake config wants libnvrtc; a slim toolkit may not have it, torch's pip dependencies do.
    nvrtc = sorted(glob.glob(str(cuda_home / "lib64" / "libnvrtc.so*")))
    if not nvrtc:
        for r in roots:
            nvrtc = sorted(glob.glob(str(r / "lib" / "libnvrtc.so*")))
            nvrtc = [p for p in nvrtc if "builtins" not in p and ".alt." not in p]
            if nvrtc:
                break
    if nvrtc:
        args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    # torch's CUDA headers (ATen/cuda/CUDAContext.h) include cusparse.h, cublas_v2.h, ...: take those the toolkit
    # lacks from the pip packages, searched after the toolkit's own include dir.
    extra = []
    for header in ("cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h", "curand.h", "cufft.h"):
        if (cuda_home / "include" / header).exists():
            continue
        for r in roots:
            if (r / "include" / header).exists():
                if str(r / "include") not in extra:
                    extra.append(str(r / "include"))
                break
    if extra:
        args.append(f"-DLAYERSKIP_CUDA_EXTRA_INCLUDE_DIRS={';'.join(extra)}")
    return args


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import torch
        import torch.utils

        ext_fullpath = Path.cwd() / self.get_ext_fullpath(ext.name)
        extdir = ext_fullpath.parent.resolve()
        ext_suffix = ext_fullpath.name[len("_C"):]  # e.g. .cpython-311-x86_64-linux-gnu.so
        build_temp = Path(self.build_temp).resolve() / "cmake"
        build_temp.mkdir(parents=True, exist_ok=True)
        build_type = os.environ.get("LAYERSKIP_BUILD_TYPE", "Release")

        want = _env_flag("LAYERSKIP_CUDA")
        cuda_home = _find_cuda_home() if want != "0" else None
        with_cuda = False
        if want == "0":
            _log("LAYERSKIP_CUDA=0: CPU-only build")
        elif torch.version.cuda is None:
            if want == "1":
                raise RuntimeError("LAYERSKIP_CUDA=1 but the installed torch is not a CUDA build")
            _log(f"torch {torch.__version__} is not a CUDA build: CPU-only build")
        elif cuda_home is None:
            if want == "1":
                raise RuntimeError("LAYERSKIP_CUDA=1 but no CUDA toolkit (nvcc) found: set CUDA_HOME")
            _log("no CUDA toolkit (nvcc) found: CPU-only build")
        else:
            ver = _nvcc_version(cuda_home)
            torch_major = int(torch.version.cuda.split(".")[0])
            if ver is not None and ver[0] != torch_major and want != "1":
                _log(f"nvcc {ver} does not match torch's CUDA {torch.version.cuda}: CPU-only build "
                     "(LAYERSKIP_CUDA=1 to try anyway)")
            else:
                with_cuda = True
                _log(f"CUDA build with {cuda_home} (nvcc {ver}), torch CUDA {torch.version.cuda}")

        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake >= 3.25 is needed to build layerskip_ext (pip install cmake)")
        cmake_args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DTorch_DIR={Path(torch.utils.cmake_prefix_path) / 'Torch'}",
            f"-DLAYERSKIP_OUTPUT_DIR={extdir}",
            f"-DLAYERSKIP_EXT_SUFFIX={ext_suffix}",
            f"-DLAYERSKIP_CUDA={'ON' if with_cuda else 'OFF'}",
            f"-DLAYERSKIP_VERSION={self.distribution.get_version()}",
            f"-DLAYERSKIP_TORCH_VERSION={torch.__version__}",
            f"-DLAYERSKIP_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        ]
        if shutil.which("ninja"):
            cmake_args.append("-GNinja")
        if with_cuda:
            cmake_args += _cuda_cmake_args(cuda_home)
            archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or "8.0;9.0"
            cmake_args.append(f"-DTORCH_CUDA_ARCH_LIST={archs}")
        cmake_args += [a for a in os.environ.get("LAYERSKIP_CMAKE_ARGS", "").split() if a]

        build_args = ["--config", build_type]
        jobs = os.environ.get("MAX_JOBS") or os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL")
        if jobs:
            build_args += ["--parallel", jobs]
        elif getattr(self, "parallel", None):
            build_args += ["--parallel", str(self.parallel)]

        # A cache from an earlier configure with other choices (CUDA on/off, another torch) would be reused by
        # CMake silently: start over when the key settings changed.
        stamp = build_temp / "layerskip_configure_args.txt"
        key = "\n".join(cmake_args)
        if stamp.exists() and stamp.read_text() != key:
            shutil.rmtree(build_temp)
            build_temp.mkdir(parents=True)
        _log("cmake " + " ".join(cmake_args))
        subprocess.run([cmake, ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        stamp.write_text(key)
        subprocess.run([cmake, "--build", ".", *build_args], cwd=build_temp, check=True)
        if not ext_fullpath.exists():
            raise RuntimeError(f"CMake did not produce {ext_fullpath}")


setup(
    ext_modules=[CMakeExtension("layerskip_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
