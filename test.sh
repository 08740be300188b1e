#!/usr/bin/env bash
# The test command: puts the test tools into .venv (once; ./setup.sh keeps the user's install lean),
# then runs pytest over the whole suite. Arguments go to pytest (e.g. -k lora, -x).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || ./setup.sh
if ! .venv/bin/python -c "import pytest, playwright, schemathesis, openai, httpx, requests, psutil, ruff" 2>/dev/null; then
  .venv/bin/python -m pip install -q -e ".[all,test]"
fi
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('spandrel') is None)"; then
  .venv/bin/python -m pip install -q --no-deps "spandrel>=0.4.2,<0.5" "einops>=0.8"  # as ./setup.sh does
fi
exec .venv/bin/python -m pytest "$@"
