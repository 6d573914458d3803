"""Build script: the pure-Python package plus, when it can be built, the CUDA extension.

``fusedres._C`` (csrc/) holds the CUTLASS conv kernels of the ``cuda`` backend.  It is
built when torch is importable in the build environment (use ``--no-build-isolation``),
a CUDA compiler is found (``$CUDA_HOME``, ``/usr/local/cuda`` or ``nvcc`` on ``PATH``)
and the CUTLASS headers are found (the ``nvidia-cutlass`` wheel's ``cutlass_library``
package, or ``$FUSEDRES_CUTLASS_DIR``).  Otherwise the install is Triton/pure-Python only
and says why; it never fails for lack of the extension.

Knobs (environment):
  FUSEDRES_SKIP_CUDA_BUILD=1   never build the extension
  FUSEDRES_CUDA_ARCHS="80;90"  SM architectures; SASS for each, plus PTX for the newest
  FUSEDRES_CUTLASS_DIR=DIR     CUTLASS include directory (the one holding cutlass/cutlass.h)
  MAX_JOBS=N                   parallel compile jobs (default: by cores and free memory)

No side effects beyond compiling: no downloads, git or pip calls.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
# Each nvcc job on the CUTLASS translation units peaks around 2 GB of host memory.
_GB_PER_JOB = 2.5


def _say(msg: str) -> None:
    print(f"fusedres setup: {msg}", file=sys.stderr, flush=True)


def _cuda_home() -> str | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for c in candidates:
        if c and (Path(c) / "bin" / "nvcc").is_file():
            return c
    return None


def _cutlass_include() -> str | None:
    env = os.environ.get("FUSEDRES_CUTLASS_DIR")
    if env:
        if (Path(env) / "cutlass" / "cutlass.h").is_file():
            return env
        _say(f"FUSEDRES_CUTLASS_DIR={env} has no cutlass/cutlass.h; ignoring it")
    # The nvidia-cutlass wheel ships the headers as package data of cutlass_library; find
    # it without importing it.
    spec = importlib.util.find_spec("cutlass_library")
    if spec and spec.origin:
        inc = Path(spec.origin).parent / "source" / "include"
        if (inc / "cutlass" / "cutlass.h").is_file():
            return str(inc)
    return None


def _archs() -> list[str]:
    raw = os.environ.get("FUSEDRES_CUDA_ARCHS", "80;90")
    archs = [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"FUSEDRES_CUDA_ARCHS must be like '80;90', got {raw!r}")
    return sorted(set(archs), key=int)


def _default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(l.split()[1]) for l in f if l.startswith("MemAvailable"))
        by_mem = max(1, int(avail_kb / 1024**2 / _GB_PER_JOB))
    except (OSError, StopIteration):
        by_mem = cores
    return max(1, min(cores, by_mem))


def _torch_libstdcxx() -> list[str]:
    """Link arguments naming the shared libstdc++ that torch (imported by now) runs with.

    Without them the toolchain picks the C++ runtime, and one whose library directory
    holds only libstdc++.a (as $CXX, /opt/gcc/bin/g++, did on the GPU machine) links it
    statically: _C.so then carries a second C++ runtime whose locale facet ids are
    STB_GNU_UNIQUE symbols, merged at load time with those of the shared libstdc++ already
    in the process.  Its iostreams misread the facet tables, so formatting a TORCH_CHECK
    message (c10::str, evaluated only when a check fails) truncated the message or killed
    the process (SIGSEGV) instead of raising.  Naming the shared library that torch loaded
    makes _C.so depend on it (NEEDED libstdc++.so.6) and leaves nothing to the archive.
    """
    try:
        with open("/proc/self/maps") as f:
            # The pathname is everything after the 5th field (it may hold spaces, or end in
            # " (deleted)" when the file was replaced on disk).
            paths = {parts[5] for parts in (line.rstrip("\n").split(maxsplit=5) for line in f) if len(parts) == 6}
    except OSError:  # not Linux: the platform's own toolchain rules apply
        return []
    libs = sorted(p for p in paths if Path(p).name.startswith("libstdc++.so") and Path(p).is_file())
    if not libs:
        _say("no shared libstdc++ mapped in this process; linking the compiler's default C++ runtime "
             "(if that is a static libstdc++, failing input checks in _C may crash instead of raising)")
        return []
    if len(libs) > 1:
        _say(f"several libstdc++ libraries mapped ({', '.join(libs)}); linking {libs[0]}")
    return libs[:1]


def _cuda_extension():
    """(ext_modules, cmdclass) for fusedres._C, or ([], {}) with a printed reason."""
    if os.environ.get("FUSEDRES_SKIP_CUDA_BUILD", "0") == "1":
        _say("FUSEDRES_SKIP_CUDA_BUILD=1: building without the CUDA extension (Triton/pure Python)")
        return [], {}
    cuda_home = _cuda_home()
    if cuda_home is None:
        _say("no CUDA compiler found (CUDA_HOME, /usr/local/cuda, nvcc on PATH): "
             "building without the CUDA extension (Triton/pure Python)")
        return [], {}
    cutlass = _cutlass_include()
    if cutlass is None:
        _say("CUTLASS headers not found (install nvidia-cutlass or set FUSEDRES_CUTLASS_DIR): "
             "building without the CUDA extension (Triton/pure Python)")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when imported.
    os.environ.setdefault("CUDA_HOME", cuda_home)
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:
        _say(f"torch is not importable in the build environment ({exc}); build with "
             "`pip install --no-build-isolation`. Building without the CUDA extension")
        return [], {}

    archs = _archs()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    _say(f"building fusedres._C for sm_{', sm_'.join(archs)} (+PTX {archs[-1]}) with "
         f"MAX_JOBS={os.environ['MAX_JOBS']}, CUDA {cuda_home}, CUTLASS {cutlass}")
    cxx = ["-O3", "-std=c++20"]
    nvcc = [
        "-O3",
        "-std=c++20",
        "-DNDEBUG",
        "--expt-relaxed-constexpr",
        # torch's flags hide the half/bf16 operators that CUTLASS's types rely on.
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-U__CUDA_NO_HALF2_OPERATORS__",
        # Resource report (registers, spills) per kernel; scripts/wheel_smoke.sh checks it.
        "-Xptxas=-v",
        *gencode,
    ]
    ext = CUDAExtension(
        name="fusedres._C",
        sources=[
            "csrc/fusedres.cpp",
            "csrc/cuda/ops.cu",
            "csrc/cuda/fprop_bf16.cu",
            "csrc/cuda/fprop_fp16.cu",
        ],
        include_dirs=[str(ROOT / "csrc" / "cuda"), cutlass],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=_torch_libstdcxx(),
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
