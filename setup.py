"""Builds fastoptim._C: CPU kernels always; CUDA kernels too when torch is a CUDA build and nvcc is found.

Environment:
  FASTOPTIM_CUDA=0|1        force the CUDA kernels off, or on (then a missing nvcc or CPU-only torch is an error)
  TORCH_CUDA_ARCH_LIST      GPU architectures to compile for; default "8.0;9.0+PTX" (A100, H100, and PTX that newer
                            GPUs compile at load)
  MAX_JOBS                  parallel compile jobs (ninja)
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py


def resolve_cuda_home():
    """Point CUDA_HOME at the toolkit behind the nvcc on PATH.

    torch guesses CUDA_HOME as the folder above nvcc; where nvcc is a wrapper or a link (/usr/local/bin/nvcc), that
    guess is /usr/local, whose lib/ has no libcudart, and the link fails. nvcc's dry run names its real toolkit
    (TOP=...). Done before torch reads CUDA_HOME.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or not shutil.which("nvcc"):
        return
    dry_run = subprocess.run(["nvcc", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True).stderr
    top = re.search(r"^#\$ TOP=(.+)$", dry_run, re.MULTILINE)
    if top:
        os.environ["CUDA_HOME"] = os.path.normpath(top.group(1).strip())


resolve_cuda_home()
from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def cuda_decision():
    """(build CUDA kernels?, why not)."""
    import torch

    requested = os.environ.get("FASTOPTIM_CUDA", "auto")
    if requested == "0":
        return False, "FASTOPTIM_CUDA=0"
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
    if cpp_extension.CUDA_HOME is None:
        reasons.append("nvcc (CUDA_HOME) was not found")
    if reasons and requested == "1":
        raise RuntimeError("FASTOPTIM_CUDA=1 but " + " and ".join(reasons))
    return not reasons, " and ".join(reasons)


def pip_cuda_include_dirs():
    """Headers of the CUDA libraries (cuBLAS, cuSPARSE, ...) that torch's CUDA wheels install as `nvidia-*` packages.

    torch's CUDA headers include them, and a bare CUDA toolkit (nvcc and the runtime only) lacks them.
    """
    try:
        import nvidia
    except ImportError:
        return []
    return sorted({d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", "include"))})


def extension():
    sources = [os.path.join("csrc", name) for name in ("ops.cpp", "sparse.cpp", "module.cpp")]
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    with_cuda, why_not = cuda_decision()
    # -g0: Python's default flags ask for debug info, which triples compile time. -fno-math-errno lets sqrtf become
    # a vector instruction instead of a call that may set errno, and -fno-trapping-math lets both arms of a select
    # be computed: neither changes a result, and without them the CPU chunk loops stay scalar. -fno-wrapv undoes
    # Python's -fwrapv: with int indices that must wrap, GCC recomputes 64-bit addresses each iteration (Kron's
    # 1-D block sweeps ran at half speed with it).
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-fno-wrapv"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not with_cuda:
        print(f"\n*** fastoptim: building CPU kernels only; CUDA kernels were NOT built ({why_not}). ***\n")
        return cpp_extension.CppExtension(
            "fastoptim._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    print(f"fastoptim: building CPU and CUDA kernels for architectures {os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    return cpp_extension.CUDAExtension(
        "fastoptim._C", sources, include_dirs=include_dirs + pip_cuda_include_dirs(),
        extra_compile_args={"cxx": cxx + ["-DFASTOPTIM_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo", "-DFASTOPTIM_WITH_CUDA"]},
        extra_link_args=["-fopenmp"],
    )


class BuildPyWithSuites(build_py):
    """A wheel carries the benchmark suites (bench/*.py and the saved baselines) as fastoptim/bench/suite/bench/, so
    that `fastoptim bench` runs from an installed package; a source checkout runs bench/ itself."""

    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "fastoptim", "bench", "suite", "bench")
        for source in glob.glob(os.path.join(ROOT, "bench", "*.py")) + glob.glob(
                os.path.join(ROOT, "bench", "results", "*", "baseline.json")):
            relative = os.path.relpath(source, os.path.join(ROOT, "bench"))
            os.makedirs(os.path.dirname(os.path.join(target, relative)), exist_ok=True)
            self.copy_file(source, os.path.join(target, relative))


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True), "build_py": BuildPyWithSuites},
)
