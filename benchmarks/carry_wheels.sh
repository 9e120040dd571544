#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels benchmarks/gpu_suite.py unpacks on the GPU machine,
# which has no network (Python 3.12, x86_64; see docs/benchmarks.md for the device command):
#   .whl/suite/     ftfy + wcwidth (PS3Tokenizer's dependency, missing there)
#   .whl/peers/     xformers 0.0.35 (3 MB; its extension is built for torch 2.10 + CUDA 12.8: the suite
#                   installs it only where torch and CUDA match, and says why not otherwise)
#   .whl/upstream/  upstream PS3 (NVlabs/PS3 at the mirror's commit, built here into a wheel) with
#                   the versions it pins (timm 1.0.15, transformers 4.57.0) and what transformers
#                   4.57 needs below the machine's own versions (tokenizers < 0.23.1, huggingface_hub < 1).
# Everything else upstream imports (torch, torchvision, einops, accelerate, tiktoken, pillow,
# safetensors, ...) is already on the machine. Run from anywhere, on a machine with a registry:
#   bash benchmarks/carry_wheels.sh [PS3_MIRROR]        # PS3_MIRROR: a git dir of NVlabs/PS3
set -euo pipefail
cd "$(dirname "$0")/.."
mirror=${1:-/work/.mirror/NVlabs+PS3/repo}
py=${PYTHON:-python3}
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
download() {  # download DIR REQUIREMENT...
    local dir=$1; shift
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$dir" "$@"
}

rm -rf .whl/suite .whl/peers .whl/upstream
mkdir -p .whl/suite .whl/peers .whl/upstream
download .whl/suite ftfy==6.3.1 wcwidth==0.9.4
download .whl/peers xformers==0.0.35
download .whl/upstream timm==1.0.15 transformers==4.57.0 tokenizers==0.22.1 huggingface_hub==0.36.0

# Upstream's package only (ps3/, pyproject.toml, README, LICENSE), not its assets or training code.
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git -C "$mirror" archive HEAD ps3 pyproject.toml README.md LICENSE.md | tar -x -C "$src"
"$py" -m pip wheel -q --no-deps -w .whl/upstream "$src"
git -C "$mirror" rev-parse HEAD > .whl/upstream/UPSTREAM_COMMIT

ls -l .whl/suite .whl/peers .whl/upstream
du -sh .whl
