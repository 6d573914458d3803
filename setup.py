"""Build script: the pure-Python package plus, when it can be built, the CUDA extension.

``fusedres._C`` (csrc/) holds the CUTLASS conv kernels of the ``cuda`` backend.  It is
built when torch is importable in the build environment (use ``--no-build-isolation``),
a CUDA compiler is found (``$CUDA_HOME``, ``/usr/local/cuda`` or ``nvcc`` on ``PATH``)
and the CUTLASS headers are found (the ``nvidia-cutlass`` wheel's ``cutlass_library``
package, or ``$FUSEDRES_CUTLASS_DIR``).  Otherwise the install is Triton/pure-Python only
and says why; it never fails for lack of the extension.

Knobs (environment):
  FUSEDRES_SKIP_CUDA_BUILD=1   never build the extension
  FUSEDRES_CUDA_ARCHS="80;90"  SM architectures; SASS for each, plus PTX for the newest.
                               "90a" (e.g. "80;90a") also builds the Hopper-native sm_90a
                               kernels (CUTLASS 3.x, TMA + wgmma; csrc/cuda/fprop_sm90.cuh),
                               opt-in at run time with FUSEDRES_CUDA_SM90A=1 until verified
                               on a GPU; build it instead of "90", not with it (an H100 would
                               have two SASS images to choose from)
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
# Each nvcc job on the CUTLASS 2.x translation units peaks around 2 GB of host memory; the
# CUTLASS 3.x sm_90a ones at 3.5 GB (nvcc 13.0).
_GB_PER_JOB = 2.5
_GB_PER_JOB_SM90A = 3.6


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
    if not archs or not all(a.isdigit() or (a[:-1].isdigit() and a.endswith("a")) for a in archs):
        raise SystemExit(f"FUSEDRES_CUDA_ARCHS must be like '80;90' or '80;90a', got {raw!r}")
    if any(a.endswith("a") and a != "90a" for a in archs):
        raise SystemExit(f"FUSEDRES_CUDA_ARCHS: of the arch-specific targets only 90a has kernels, got {raw!r}")
    if "90" in archs and "90a" in archs:
        raise SystemExit("FUSEDRES_CUDA_ARCHS: give 90a instead of 90, not both (an sm_90 GPU would have "
                         "two SASS images of every kernel to choose from)")
    return sorted(set(archs), key=lambda a: int(a.rstrip("a")))


def _gencode(archs: list[str]) -> list[str]:
    """SASS for every arch, plus PTX of the newest one's portable form (compute_90 for 90a):
    arch-specific PTX would not JIT on later GPUs."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    ptx = archs[-1].rstrip("a")
    flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return flags


def _default_max_jobs(gb_per_job: float = _GB_PER_JOB) -> int:
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(l.split()[1]) for l in f if l.startswith("MemAvailable"))
        by_mem = max(1, int(avail_kb / 1024**2 / gb_per_job))
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
    sm90a = "90a" in archs
    sources = ["csrc/fusedres.cpp", "csrc/cuda/ops.cu", "csrc/cuda/fprop_bf16.cu", "csrc/cuda/fprop_fp16.cu"]
    include_dirs = [str(ROOT / "csrc" / "cuda"), cutlass]
    defines = []
    if sm90a:
        # CUTLASS 3.x's conv collectives include cutlass/util/packed_stride.hpp, which the
        # repository (and the nvidia-cutlass wheel) keeps under tools/util/include.
        # (A CMake-installed CUTLASS has it in the include directory itself.)
        util = Path(cutlass).parent / "tools" / "util" / "include"
        packed = Path("cutlass") / "util" / "packed_stride.hpp"
        if not (util / packed).is_file() and not (Path(cutlass) / packed).is_file():
            raise SystemExit(f"FUSEDRES_CUDA_ARCHS has 90a, but neither {cutlass} nor CUTLASS's tools/util/include "
                             f"next to it has {packed} (the sm_90a kernels need it)")
        sources += ["csrc/cuda/fprop_sm90_bf16.cu", "csrc/cuda/fprop_sm90_fp16.cu"]
        if (util / packed).is_file():
            include_dirs.append(str(util))
        defines.append("-DFUSEDRES_HAVE_SM90A")
    gencode = _gencode(archs)
    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs(_GB_PER_JOB_SM90A if sm90a else _GB_PER_JOB)))
    _say(f"building fusedres._C for sm_{', sm_'.join(archs)} (+PTX {archs[-1].rstrip('a')}) with "
         f"MAX_JOBS={os.environ['MAX_JOBS']}, CUDA {cuda_home}, CUTLASS {cutlass}")
    cxx = ["-O3", "-std=c++20", *defines]
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
        *defines,
        *gencode,
    ]
    ext = CUDAExtension(
        name="fusedres._C",
        sources=sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=_torch_libstdcxx(),
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
