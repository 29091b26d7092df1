"""Optional CUDA build of gptq_vllm._C (csrc/); all metadata lives in pyproject.toml.

On a machine with torch + nvcc:  pip install --no-build-isolation -e .   (or: python setup.py build_ext --inplace)
builds the kernels for sm_80, sm_89 and sm_90a (override with TORCH_CUDA_ARCH_LIST; 9.0 is built as 9.0a, see
gptq_vllm/kernels/build.py); CUTLASS's headers come from the `nvidia-cutlass` package, which must be installed.  Anywhere else (no torch in
the build environment, e.g. pip's isolated build, or no CUDA toolkit) nothing is compiled and the package installs
as pure Python; gptq_vllm.kernels.cuda then JIT-builds on first use when CUDA is there.  GPTQ_VLLM_NO_CUDA=1 skips
the build explicitly.
"""

import os

from setuptools import setup


def _build_module():
    """gptq_vllm/kernels/build.py, loaded by path (the package itself imports torch and vLLM-facing code)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gptq_vllm", "kernels", "build.py")
    spec = importlib.util.spec_from_file_location("gptq_vllm_build", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ext_modules():
    if os.environ.get("GPTQ_VLLM_NO_CUDA", "0") == "1":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception:  # noqa: BLE001 - no torch in the build environment: pure-Python install
        return [], {}
    if CUDA_HOME is None:
        return [], {}
    build = _build_module()
    os.environ["TORCH_CUDA_ARCH_LIST"] = build.with_sm90a(os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;8.9;9.0"))
    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.relpath(p, here) for p in build.sources()]
    ext = CUDAExtension(
        name="gptq_vllm._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")] + build.cutlass_include_dirs(),
        extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
