#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with ldmkit, its server and training extras.
# (./test.sh adds the test tools: pytest, Playwright, schemathesis... which users do not need.)
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch, pinned: an unpinned torch can pull a multi-GB CUDA build.
# (The package itself accepts a torch range; install a CUDA build yourself for GPUs.)
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all]"
# Upscaler models (the `upscale` extra): spandrel without its torchvision, which it imports only for two
# architectures ldmkit does not run (ldmkit.upscalers) and whose PyPI build does not load beside the CPU torch.
.venv/bin/python -m pip install -q --no-deps "spandrel>=0.4.2,<0.5" "einops>=0.8"
echo "ldmkit is installed in .venv: try  .venv/bin/ldm generate \"red apple\""
