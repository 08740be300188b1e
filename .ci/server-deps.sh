#!/usr/bin/env bash
# What the server tests need beyond the package itself: Debian's Chromium for the browser test
# (Playwright drives it; no browser is ever downloaded), the server's packages and the test clients.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y chromium
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet \
  "fastapi==0.165.0" "uvicorn==0.54.0" "gradio==6.31.0" "python-multipart==0.0.34" \
  "openai==3.57.0" "playwright==1.65.2" "requests==2.34.2"
