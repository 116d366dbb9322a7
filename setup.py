"""Package set-up for megatron_evomoe.

The Triton kernels live in the top-level ``kernels/`` folder but install as
``megatron_evomoe.kernels`` so they can never clash with the unrelated PyPI
package called ``kernels``.

The C++/CUDA extension in ``csrc/`` is optional: it is built only when a
compiler (and, for the CUDA part, nvcc with a CUDA build of torch) is present,
and any error while building it is one line on stderr and a skipped extension
(``EVOMOE_STRICT_BUILD=1`` makes it fatal); see csrc/build.py.
Install with ``--no-build-isolation`` so the build sees the torch already
installed instead of pulling a multi-GB CUDA wheel into an isolated env.
"""
from setuptools import find_packages, setup

from csrc.build import extension_modules_and_cmdclass

ext_modules, cmdclass = extension_modules_and_cmdclass()

packages = find_packages(include=["megatron_evomoe", "megatron_evomoe.*"])
packages.append("megatron_evomoe.kernels")

setup(
    name="megatron_evomoe",
    version="0.1.0",
    description="Megatron-style training of multimodal MoE LLMs with EvoMoE "
    "(expert evolution + dynamic token-aware router)",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"megatron_evomoe.kernels": "kernels"},
    py_modules=[],
    install_requires=[
        # Pin-free lower bounds; CI installs torch==2.13.0 (CPU wheel) first. torch: the newest API
        # used (SDPA enable_gqa, serialization.safe_globals, torch.OutOfMemoryError: 2.5); newer ones
        # have a fallback. tests/csrc/test_torch_floor.py keeps this true.
        "torch>=2.5",
        "triton>=3.0; platform_system=='Linux'",
        "numpy",
        "pyyaml",
        "pillow",
        "tqdm",
        "tensorboard",
        "safetensors",  # megatron_evomoe.convert (Hugging Face import/export)
    ],
    extras_require={
        "test": ["pytest", "matplotlib", "tokenizers", "transformers", "pandas", "openpyxl"],
        # The MMBench submission .xlsx (megatron_evomoe.eval.mmbench_submission).
        "eval": ["pandas", "openpyxl"],
        # Built from source / CUDA-only. NVIDIA apex is not on PyPI (the PyPI
        # 'apex' is an unrelated project): build it from source and it is
        # detected at run time through `import apex.optimizers`.
        "gpu": ["megablocks", "transformer-engine[pytorch]"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["evomoe-report=megatron_evomoe.tools.report:main"]},
)
