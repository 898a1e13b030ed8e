#!/usr/bin/env bash
# Build the compiled part of the mamba_ssm peer on the GPU machine (no network there): causal-conv1d from its
# source, for sm_90 only (Hopper; ~3 minutes on 14 cores instead of ~20 for every architecture).
#
#   bash benchmarks/peers/setup_gpu_peers.sh [SRC] [DEST]
#
# SRC: a checkout of Dao-AILab/causal-conv1d carried with the call (default third_party_peers/causal-conv1d,
# git-ignored); DEST: where the built package goes (default /tmp/peers; put it on PYTHONPATH). mamba_ssm itself
# needs no build: its Python sources in third_party_peers/site (empty mamba_ssm/__init__.py) use Triton.
set -euo pipefail
SRC="${1:-third_party_peers/causal-conv1d}"
DEST="${2:-/tmp/peers}"
# A build saved by an earlier call (compare.sh's `build` writes $OUT/causal_conv1d_sm90.tgz; keep it as
# third_party_peers/causal_conv1d_sm90.tgz) is unpacked instead, when it was made against this torch.
SAVED="${SAVED:-third_party_peers/causal_conv1d_sm90.tgz}"
torch_version="$(python3 -c 'import torch; print(torch.__version__)')"
if [ -f "$SAVED" ] && tar -xOzf "$SAVED" ./TORCH_VERSION 2>/dev/null | grep -qxF "$torch_version"; then
    mkdir -p "$DEST" && tar -xzf "$SAVED" -C "$DEST"
    echo "causal-conv1d unpacked from $SAVED (built against torch $torch_version)"
    exit 0
fi
[ -f "$SRC/setup.py" ] || { echo "no causal-conv1d checkout at $SRC (docs/benchmarks.md, Peers)" >&2; exit 2; }
work="$(mktemp -d)"
cp -r "$SRC"/. "$work"
python3 - "$work/setup.py" <<'PY'
import re
import sys

path = sys.argv[1]
text = open(path).read()
pair = re.compile(r'cc_flag\.append\("-gencode"\)\n\s*cc_flag\.append\("arch=compute_(\d+),code=sm_\d+"\)')
trimmed = pair.sub(lambda m: m.group(0) if m.group(1) == "90" else "pass", text)
assert "arch=compute_90,code=sm_90" in trimmed and "compute_80" not in trimmed, "setup.py changed: trim by hand"
open(path, "w").write(trimmed)
PY
cd "$work"
start=$(date +%s)
CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS="${MAX_JOBS:-14}" \
    python3 -m pip install -q --no-build-isolation --no-deps --target "$DEST" .
echo "causal-conv1d built into $DEST in $(( $(date +%s) - start )) s"
echo "$torch_version" > "$DEST/TORCH_VERSION"
