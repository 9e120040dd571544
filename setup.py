from setuptools import find_packages, setup

setup(
    name="ps3-kernels",
    version="0.1.0",
    description="Triton kernels and a drop-in PyTorch implementation of PS3 / VILA-HD",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ps3", "ps3.*", "ps3_kernels", "ps3_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "transformers>=4.45",
        "pillow",
        "ftfy",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "test": ["pytest", "triton>=3.6", "pytest-benchmark", "matplotlib", "tqdm", "webdataset"],
        "bench": ["triton>=3.6", "matplotlib", "tqdm", "pytest-benchmark"],
        "flash": ["flash-attn"],
        "xformers": ["xformers"],
        "webdataset": ["webdataset"],
    },
    entry_points={
        "console_scripts": ["ps3-encode=ps3.cli:main", "ps3-bench=ps3.bench:main", "ps3-extract=ps3.extract.cli:main"]
    },
)
