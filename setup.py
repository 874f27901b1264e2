"""Builds head4d and its compiled extension head4d._C.

    pip install --no-build-isolation -e .     # builds against the torch you have

The C++ (CPU) sources are always compiled. The CUDA sources are compiled too when
torch was built with CUDA and nvcc is found (CUDA_HOME or PATH), for the
architectures in TORCH_CUDA_ARCH_LIST (default "8.0;9.0": A100 and H100).

Environment:
    HEAD4D_CUDA=0|1          force the CUDA sources off or on (default: auto)
    HEAD4D_EMULATION=1       also build head4d._C_emulated: the CUDA kernels compiled as
                             host C++ against csrc/cuda_emulation/ (with AddressSanitizer),
                             which the `cuda_emulated` test backend runs on CPU tensors
    HEAD4D_EMULATION_ASAN=0  build the emulated module without AddressSanitizer
    HEAD4D_SKIP_EXTENSION=1  install the Python package only (ops use the reference)
    MAX_JOBS=N               parallel compile jobs (ninja)
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

PACKAGES = find_packages(include=["head4d", "head4d.*"]) + ["head4d.kernels"]
PACKAGE_DIR = {"head4d.kernels": "kernels"}

setup_kwargs = dict(
    name="head4d",
    version="0.1.0",
    description="Fast CUDA/Triton kernels for one-shot 4D head avatars (triplane NeRF heads)",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"head4d": ["backend_order.json"]},  # read by head4d/_preferences.py
    install_requires=["torch>=2.1", "numpy", "safetensors", "einops"],
    extras_require={
        "triton": ["triton>=3.0"],
        "profile": ["nvtx"],
        "train": ["torchvision", "lpips", "tensorboard"],  # LPIPS's VGG, TensorBoard logs
        "dev": ["pytest", "pytest-benchmark", "nvtx", "torchvision", "lpips", "tensorboard"],
    },
    entry_points={"console_scripts": ["head4d=head4d.cli:main"]},
)


def _find_cuda_home():
    """torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (as on
    machines with /usr/local/bin/nvcc) makes it guess a folder without CUDA's headers.
    Point it at the toolkit that has them, unless the user set CUDA_HOME."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    import shutil

    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")) and \
                os.path.exists(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


def extension_kwargs():
    _find_cuda_home()
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit(
            "head4d builds its extension against the torch installed in your environment, "
            "and none was importable. Install torch first, then build without isolation:\n"
            "    pip install --no-build-isolation -e .\n"
            "(or set HEAD4D_SKIP_EXTENSION=1 to install the Python package alone)."
        )

    want_cuda = os.environ.get("HEAD4D_CUDA", "auto")
    has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda == "1" and not has_cuda:
        sys.exit("HEAD4D_CUDA=1 but torch has no CUDA or nvcc was not found (set CUDA_HOME).")
    use_cuda = has_cuda if want_cuda == "auto" else want_cuda == "1"

    def rel(paths):
        return sorted(os.path.relpath(p, ROOT) for p in paths)

    cpp_sources = [p for p in rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cpp"), recursive=True))
                   if not p.startswith(os.path.join("csrc", "cuda_emulation"))]
    cuda_sources = [p for p in rel(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
                    if not p.startswith(os.path.join("csrc", "cuda_emulation"))]

    include_dirs = [os.path.join(ROOT, "csrc")]
    # torch's BuildExtension adds the C++ standard its headers need (C++17 or C++20).
    # -fno-trapping-math: head4d never reads floating-point exception flags, and without
    # it GCC may not compute both sides of a select (`z > 0 ? z : z * alpha`), so the
    # element loops of the CPU kernels would stay scalar. Results are unchanged (this is
    # not -ffast-math: rounding, NaN and infinity follow IEEE as before).
    cxx_flags = ["-O3", "-fno-trapping-math"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # ATen's parallel_for is an inline OpenMP loop when torch is built with OpenMP (the
        # Linux wheels are): without -fopenmp here it would compile to a serial loop and
        # every CPU kernel of head4d._C would run on one thread.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    define_macros = []
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        define_macros.append(("HEAD4D_WITH_CUDA", None))
        # pip's CUDA wheels keep some headers (cusparse.h, ...) in site-packages/nvidia/cu*/include.
        # Searched after the toolkit's own headers, so they only fill what the toolkit lacks.
        try:
            import nvidia

            for base in nvidia.__path__:
                for extra in sorted(glob.glob(os.path.join(base, "cu*", "include"))):
                    cxx_flags += ["-idirafter", extra]
                    nvcc_flags += ["-Xcompiler", "-idirafter" + extra]
        except ImportError:
            pass
        ext = cpp_extension.CUDAExtension(
            "head4d._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        ext = cpp_extension.CppExtension(
            "head4d._C",
            cpp_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    ext_modules = [ext]
    if os.environ.get("HEAD4D_EMULATION", "0") == "1":
        ext_modules.append(emulated_extension(cpp_extension, cpp_sources, cuda_sources, include_dirs))
    print(f"head4d: building head4d._C with{'' if use_cuda else 'out'} CUDA kernels "
          f"(torch {torch.__version__}, CUDA_HOME={cpp_extension.CUDA_HOME}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '-')})")
    return dict(ext_modules=ext_modules,
                cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)})


def emulated_extension(cpp_extension, cpp_sources, cuda_sources, include_dirs):
    """head4d._C_emulated: the same host files and the CUDA kernels, each .cu compiled as
    host C++, with the emulation's stand-ins for the CUDA headers first on the include
    path. Every source goes through a one-line wrapper in build/cuda_emulated/: a .cu
    would otherwise be handed to nvcc, and the host files' objects would land on the
    paths of head4d._C's own (same sources, other flags), so each build of one module
    would recompile the other's."""
    wrapper_dir = os.path.join(ROOT, "build", "cuda_emulated")
    os.makedirs(wrapper_dir, exist_ok=True)
    emulation_dir = os.path.join("csrc", "cuda_emulation")
    sources = cpp_sources + cuda_sources + [os.path.join(emulation_dir, "selftest_kernels.cu"),
                                            os.path.join(emulation_dir, "emulation.cpp")]
    wrappers = []
    for source in sources:
        stem = os.path.splitext(source)[0].replace(os.sep, "__")
        path = os.path.join(wrapper_dir, stem + ("_cu" if source.endswith(".cu") else "") + ".cpp")
        text = f'// generated by setup.py: {source} in the CUDA emulation build\n' \
               f'#include "{os.path.join(ROOT, source)}"\n'
        if not os.path.exists(path) or open(path).read() != text:
            with open(path, "w") as f:
                f.write(text)
        wrappers.append(os.path.relpath(path, ROOT))
    flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-Wno-unknown-pragmas"]
    link = []
    if sys.platform.startswith("linux"):
        flags.append("-fopenmp")
        link.append("-fopenmp")
    if os.environ.get("HEAD4D_EMULATION_ASAN", "1") == "1":
        flags.append("-fsanitize=address")
        link.append("-fsanitize=address")
    return cpp_extension.CppExtension(
        "head4d._C_emulated",
        wrappers,
        include_dirs=[os.path.join(ROOT, emulation_dir, "include")] + include_dirs,
        define_macros=[("HEAD4D_WITH_CUDA", None), ("HEAD4D_CUDA_EMULATION", None)],
        extra_compile_args={"cxx": flags},
        extra_link_args=link,
    )


if os.environ.get("HEAD4D_SKIP_EXTENSION", "0") != "1":
    setup_kwargs.update(extension_kwargs())

setup(**setup_kwargs)
