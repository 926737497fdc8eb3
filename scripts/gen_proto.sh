#!/usr/bin/env bash
# Regenerate the gRPC/protobuf modules from src/fedtune/transport/grpc/proto/fedtune.proto.
# The generated files are committed, so users never need grpcio-tools.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
cd "$root/src"
"$python" -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  fedtune/transport/grpc/proto/fedtune.proto
# Generated code is not ours to lint.
for f in fedtune/transport/grpc/proto/fedtune_pb2*.py*; do
  { echo "# ruff: noqa"; cat "$f"; } > "$f.tmp" && mv "$f.tmp" "$f"
done
# ... nor to format by hand: make it match the repository's formatter so `ruff format --check` passes.
if [ -x "$root/.venv/bin/ruff" ]; then
  "$root/.venv/bin/ruff" format -q fedtune/transport/grpc/proto/
fi
echo "generated: $(ls fedtune/transport/grpc/proto/fedtune_pb2*.py* | tr '\n' ' ')"
