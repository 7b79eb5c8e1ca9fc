"""megatron-minitron: Minitron-style pruning and distillation for megatron-core models."""

from setuptools import find_packages, setup

setup(
    name="megatron-minitron",
    version="0.1.0",
    description="Structured pruning (activation importance) and knowledge distillation for megatron-core models, "
                "at any tensor/pipeline/data-parallel layout, on GPU and on CPU",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_minitron", "megatron_minitron.*"]),
    install_requires=[
        # megatron-core is pinned: the CPU runtime patches exactly this version (runtime/cpu.py).
        "megatron-core==0.16.1",
        # torch is deliberately unpinned here: NVIDIA containers bring their own build; on CPU machines
        # the README installs the CPU wheel first.
        "torch>=2.4",
        "numpy",
        "sentencepiece",
        # dist_checkpointing saves through a process pool that needs psutil.
        "psutil",
        # importance scores and Hugging Face weights are safetensors files.
        "safetensors",
        # checksums.json records BLAKE3 digests (model/integrity.py): cryptographic, 2.4x faster than SHA-256.
        "blake3>=1.0",
    ],
    extras_require={
        # lm-eval: tests cross-check our model against lm-eval's own Hugging Face backend (needs accelerate).
        "test": ["pytest>=8", "pytest-timeout", "tokenizers", "transformers", "matplotlib", "lm-eval>=0.4.13,<0.5",
                 "accelerate"],
        "hf": ["tokenizers", "transformers"],
        # downstream tasks: `minitron evaluate --tasks` (megatron_minitron/evaluation/); 0.4.13's TemplateLM API.
        "eval": ["lm-eval>=0.4.13,<0.5", "tokenizers"],
        # Transformer Engine comes with NVIDIA's PyTorch containers; this extra is for other GPU machines.
        "te": ["transformer_engine[pytorch]"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["minitron=megatron_minitron.cli:main"]},
)
