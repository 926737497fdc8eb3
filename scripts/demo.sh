#!/usr/bin/env bash
# Set up (first run only) and run the embedded demo: federated LoRA fine-tuning of SmolLM2-135M-Instruct
# on Shakespeare's plays, one client per (play, role). Extra arguments go to `fedtune run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/fedtune run examples/shakespeare_smollm2.yaml "$@"
