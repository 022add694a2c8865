"""Build fastmnist and its fused-operator extension, fastmnist._C.

One extension in the manner of pytorch/extension-cpp: csrc/*.cpp (schemas,
autograd), csrc/cpu/*.cpp (the CPU ops) and csrc/cpu/engine/*.cpp (the CPU
convolution engine) always, csrc/cuda/*.cu when CUDA is on. CUDA is decided from
the toolkit and torch.version.cuda, never from torch.cuda.is_available(), so a
GPU-less machine still compiles and links the CUDA sources.

Environment switches:
  FASTMNIST_CPU_ONLY=1   build the CPU kernels only
  FORCE_CUDA=1           fail unless the CUDA kernels are built
  DEBUG=1                -O0 -g instead of -O3 (and -lineinfo for nvcc)
  LINEINFO=1             -lineinfo for nvcc at -O3: compute-sanitizer reports then name source lines
  CUDA_HOME / CUDA_PATH  the CUDA toolkit (else found from nvcc, else /usr/local/cuda)
  TORCH_CUDA_ARCH_LIST   GPU architectures (default "8.0;9.0" when no GPU is visible)

The extension is valid only with the torch it is built against: the build
records that torch in fastmnist/_build_info.py (fastmnist.ops refuses to load
_C under another torch, saying so), and the wheel requires that torch release.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _is_toolkit(path):
    """A CUDA toolkit has nvcc, the runtime headers and libcudart (a bin/nvcc alone
    may be a wrapper script in /usr/local/bin)."""
    if not path or not os.path.isfile(os.path.join(path, "bin", "nvcc")):
        return False
    if not os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")):
        return False
    lib_dirs = ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"), os.path.join("targets", "sbsa-linux", "lib"))
    return any(glob.glob(os.path.join(path, d, "libcudart.so*")) for d in lib_dirs)


def find_cuda_home():
    """The real CUDA toolkit folder, or None.

    torch guesses the toolkit as the grandparent of the first nvcc on PATH; on
    machines where that nvcc is a wrapper script (/usr/local/bin/nvcc ->
    exec /usr/local/cuda-13.0/bin/nvcc) the guess is /usr/local and the link
    fails on -lcudart. So: CUDA_HOME/CUDA_PATH, then the folder of the real
    nvcc (symlinks resolved, wrapper scripts read), then /usr/local/cuda.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if _is_toolkit(os.environ.get(var)):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates = [os.path.realpath(nvcc)]
        try:  # a wrapper script names the real nvcc in its exec line
            with open(candidates[0], "r", errors="ignore") as f:
                head = f.read(4096)
            if head.startswith("#!"):
                candidates += [w for w in head.split() if w.endswith("/nvcc")]
        except OSError:
            pass
        for c in candidates:
            home = os.path.dirname(os.path.dirname(os.path.realpath(c)))
            if _is_toolkit(home):
                return home
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


def build_config():
    cpu_only = _flag("FASTMNIST_CPU_ONLY")
    force_cuda = _flag("FORCE_CUDA")
    cuda_home = None if cpu_only else find_cuda_home()
    use_cuda = (not cpu_only) and torch.version.cuda is not None and cuda_home is not None
    if force_cuda and not use_cuda:
        sys.exit(
            "fastmnist: FORCE_CUDA=1 but CUDA cannot be built "
            f"(torch.version.cuda={torch.version.cuda!r}, toolkit={cuda_home!r}, "
            f"FASTMNIST_CPU_ONLY={os.environ.get('FASTMNIST_CPU_ONLY', '0')}). "
            "Install a CUDA build of torch and the CUDA toolkit, or set CUDA_HOME."
        )
    return use_cuda, cuda_home


def make_extension(use_cuda, cuda_home):
    debug = _flag("DEBUG")
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp"))
                     + glob.glob(os.path.join("csrc", "cpu", "engine", "*.cpp")))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # No -march: the same wheel must run on any x86-64 CPU. The tiles' AVX2 and
    # AVX-512 builds (csrc/cpu/engine/conv_tiles_avx2.cpp, conv_tiles_avx512.cpp)
    # carry their own `#pragma GCC target` and are chosen at run time
    # (conv_tiles.cpp); the im2col fallback for other CPUs calls torch's BLAS.
    # -fno-trapping-math lets the compiler turn the ReLU masks (r > 0 ? g : 0)
    # into vector selects instead of branches (30x on the backward's dz pass);
    # it changes no result, only whether FP exceptions may be raised speculatively.
    cxx += ["-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    extra = {"cxx": cxx}
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        extra["nvcc"] = ["-O0", "-g", "-lineinfo"] if debug else ["-O3"] + (["-lineinfo"] if _flag("LINEINFO") else [])
        ext_cls = cpp_ext.CUDAExtension
    else:
        ext_cls = cpp_ext.CppExtension
    print(
        "fastmnist build: "
        f"{'CUDA + CPU' if use_cuda else 'CPU only'} | torch {torch.__version__} "
        f"(cuda {torch.version.cuda}) | CUDA_HOME={cuda_home} | "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(torch default)')} | "
        f"debug={debug} | lineinfo={debug or _flag('LINEINFO')} | sources={sources}",
        flush=True,
    )
    return ext_cls(
        "fastmnist._C",
        sources,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        # One wheel for every CPython >= 3.10 (torch >= 2.4 itself needs 3.9+; 2.14 needs 3.10):
        # the stable ABI, declared to the compiler as well as in the wheel tag (cp310-abi3).
        # torch's BuildExtension adds the same define; setuptools alone would not.
        define_macros=[("Py_LIMITED_API", LIMITED_API_HEX)],
        py_limited_api=True,
    )


def write_build_info(folders):
    """fastmnist/_build_info.py (git-ignored): the torch this _C is built against (its version names
    the CUDA flavour too, e.g. 2.14.1+cu130). Which devices have kernels is asked of the dispatcher
    (fastmnist.ops.fused_supports), not recorded here."""
    text = (
        '"""Written by setup.py when it built fastmnist._C; not in git. fastmnist.ops compares it with\n'
        'the running torch: a compiled extension is valid only with the torch it was built against."""\n'
        f"TORCH_VERSION = {torch.__version__!r}\n"
    )
    for folder in folders:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "_build_info.py"), "w") as f:
            f.write(text)


def torch_requirement():
    """The torch release this build's extension needs: the one it is built against.

    A public-version pin (==2.14.1) also matches local builds (2.14.1+cu130);
    the full version, flavour included, is checked at import time against _build_info.py."""
    return f"torch=={torch.__version__.split('+')[0]}"


LIMITED_API_HEX = "0x030A0000"  # CPython 3.10, the cp310 of the wheel tag below
use_cuda, cuda_home = build_config()
if use_cuda:
    # torch.utils.cpp_extension reads CUDA_HOME once, when first imported: tell it the real
    # toolkit through its documented variable rather than overwriting its module state.
    os.environ["CUDA_HOME"] = cuda_home
    if "torch.utils.cpp_extension" in sys.modules and sys.modules["torch.utils.cpp_extension"].CUDA_HOME != cuda_home:
        sys.exit(f"fastmnist: torch.utils.cpp_extension was imported before setup.py chose CUDA_HOME={cuda_home}; "
                 "set CUDA_HOME in the environment instead")
import torch.utils.cpp_extension as cpp_ext  # noqa: E402  (after CUDA_HOME is settled)


class BuildExtension(cpp_ext.BuildExtension):
    """torch's BuildExtension (ninja), which also records the torch it built against."""

    def run(self):
        super().run()
        build_dir = os.path.dirname(self.get_ext_fullpath("fastmnist._C"))
        write_build_info({build_dir, os.path.join(HERE, "fastmnist")})


setup(
    install_requires=[torch_requirement(), "torchvision", "numpy", "tqdm", "Pillow"],  # Pillow: predict decodes images with it
    ext_modules=[make_extension(use_cuda, cuda_home)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
