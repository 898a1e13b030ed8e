#!/usr/bin/env bash
# easymamba beside mamba_ssm on one GPU machine, stage by stage, each result into $OUT (default ./bench-out):
#
#   bash benchmarks/peers/compare.sh build kernels peer-generate generate
#   SHAPES=2.7B bash benchmarks/peers/compare.sh generate hybrid train tests
#
# Stages (run in the order given; one that fails is reported and the next still runs):
#   build          causal-conv1d for sm_90 into /tmp/peers (setup_gpu_peers.sh), in the background: later stages
#                  that need it (peer-generate) wait for it. The build is also packed into
#                  $OUT/causal_conv1d_sm90.tgz: kept as third_party_peers/causal_conv1d_sm90.tgz, the next call
#                  unpacks it instead of building (~5 minutes saved)
#   kernels        benchmarks/ssd.py (SSD forward at every shape, decode step, conv1d; mamba_ssm's Triton SSD in
#                  the same run) and benchmarks/ssd_backward.py (forward + backward, beside mamba_ssm's autograd)
#   head-dims      ssd.py at head dim 80 and state 256 (MosaicSSDConfig(native_head_dim=True) beside the default)
#                  and ssd_backward.py there (the default, 8 warps, block_p 64 / 32 / 16, the configs that spill
#                  least by benchmarks/deviceless.py), then at the 2.7B shapes with those, each beside mamba_ssm
#   peer-generate  benchmarks/generate_mamba_ssm.py: MambaLMHeadModel.generate with CUDA graphs (no JAX there)
#   generate       benchmarks/generate.py --impls easymamba at the same shapes, batches and lengths
#   hybrid         generate.py at the Nemotron-H-8B shape, easymamba, then transformers (pure torch) in its own process
#   graphs         130M decode at b1 and b16 with XLA's CUDA graphs (command buffers) taking in the decode loop
#                  (WHILE / CONDITIONAL: generate.py --loop-graphs), beside the default; the default run also
#                  dumps the loop's optimised HLO into $OUT/hlo (to count the kernels a step launches)
#   decode-bf16    generate.py at b64 and b256 with state_dtype=bfloat16 (the peer keeps its states in bf16)
#   train          benchmarks/train_step.py, 130M-shaped, unpacked and packed with 8 sequences a row
#   tests          pytest -m gpu (the compiled kernels against their references), in TEST_WORKERS processes
#                  (default 6: the time is mostly compiling, on the CPU)
# Variables: SHAPES (default 130M,1.3B,2.7B), BATCHES (1,4,16,64,256), NEW (128), STAGE_TIMEOUT (seconds, 540),
# TEST_WORKERS (6).
# Peer sources: docs/benchmarks.md, "Peers" (third_party_peers/, git-ignored, carried with the call).
set -uo pipefail
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
SHAPES="${SHAPES:-130M,1.3B,2.7B}"
BATCHES="${BATCHES:-1,4,16,64,256}"
NEW="${NEW:-128}"
STAGE_TIMEOUT="${STAGE_TIMEOUT:-540}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PEER_PATH="third_party_peers/site:/tmp/peers${PYTHONPATH:+:$PYTHONPATH}"
OURS_PATH=".${PYTHONPATH:+:$PYTHONPATH}"  # a carried site (e.g. /tmp/site) stays on the path

stage() {  # name, command...: timed, logged to $OUT/<name>.log, never fatal
    local name="$1"; shift
    local t0=$SECONDS
    echo "== $name: $*"
    timeout "$STAGE_TIMEOUT" "$@" 2>&1 | tee "$OUT/$name.log" | grep -E '^\||^#|rror|skipped|passed|failed' || true
    echo "== $name: rc ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

for s in "$@"; do
    case "$s" in
        build)
            (bash benchmarks/peers/setup_gpu_peers.sh > "$OUT/build.log" 2>&1; rc=$?; echo "rc $rc" >> "$OUT/build.log"
             [ "$rc" = 0 ] && tar -czf "$OUT/causal_conv1d_sm90.tgz" -C /tmp/peers . && ls -l "$OUT/causal_conv1d_sm90.tgz" >> "$OUT/build.log") &
            BUILD_PID=$! ;;
        kernels)
            stage ssd_fwd env JAX_PLATFORMS=cuda PYTHONPATH="$OURS_PATH" python3 benchmarks/ssd.py --quick \
                --parts ssd,decode,conv --out "$OUT/ssd.json"
            stage ssd_bwd env JAX_PLATFORMS=cuda PYTHONPATH="$OURS_PATH" python3 benchmarks/ssd_backward.py --quick \
                --out "$OUT/ssd_backward.json" ;;
        head-dims)  # the opt-in paths for head dim 80 / state 256 beside the defaults and the peer
            stage ssd_head_dims env JAX_PLATFORMS=cuda PYTHONPATH="$OURS_PATH" python3 benchmarks/ssd.py --quick \
                --parts ssd --shapes p80,n256 --out "$OUT/ssd_head_dims.json"
            stage bwd_head_dims env JAX_PLATFORMS=cuda PYTHONPATH="$OURS_PATH" python3 benchmarks/ssd_backward.py \
                --shapes 4,5 --configs 0,10,11,14,15,16,17,18,19,20 --out "$OUT/ssd_backward_head_dims.json"
            # the configs that spill least (benchmarks/deviceless.py backward) at the 2.7B shapes
            stage bwd_spills env JAX_PLATFORMS=cuda PYTHONPATH="$OURS_PATH" python3 benchmarks/ssd_backward.py \
                --shapes 0,1 --configs 0,12,17,18,19,20 --out "$OUT/ssd_backward_spills.json" ;;
        peer-generate)
            [ -n "${BUILD_PID:-}" ] && { wait "$BUILD_PID"; tail -2 "$OUT/build.log"; }
            stage peer_generate env PYTHONPATH="$PEER_PATH" python3 benchmarks/generate_mamba_ssm.py \
                --shapes "$SHAPES" --batches "$BATCHES" --new "$NEW" --prefill-batches 1,8 --out "$OUT/peer.json" ;;
        generate)
            stage generate env JAX_PLATFORMS=cuda PYTHONPATH="$OURS_PATH" python3 benchmarks/generate.py --impls easymamba \
                --shapes "$SHAPES" --batches "$BATCHES" --new "$NEW" --prefill-batches 1,8 --out "$OUT/ours.json" ;;
        hybrid)  # one process per framework: JAX keeps the memory it has used, and transformers then runs out
            stage hybrid env PYTHONPATH="$OURS_PATH" python3 benchmarks/generate.py --impls easymamba \
                --shapes nemotron-h-8b --batches 1,16 --new 64 --repeats 2 --prefill-batches 1,8 \
                --out "$OUT/hybrid.json"
            stage hybrid_hf env PYTHONPATH="$OURS_PATH" python3 benchmarks/generate.py \
                --impls transformers --shapes nemotron-h-8b --batches 1,16 --new 64 --repeats 2 \
                --out "$OUT/hybrid_hf.json" ;;
        graphs)
            for variant in default while while-unrolled; do
                if [ "$variant" = default ]; then
                    flags="--xla_dump_to=$OUT/hlo --xla_dump_hlo_module_re=.*generate_loop.*"; graphs=()
                else
                    flags=""; graphs=(--loop-graphs "$variant")
                fi
                stage "graphs_$variant" env JAX_PLATFORMS=cuda PYTHONPATH="$OURS_PATH" XLA_FLAGS="$flags" \
                    python3 benchmarks/generate.py --impls easymamba --shapes 130M --batches 1,16 --new "$NEW" \
                    --prefill-batches "" ${graphs[@]+"${graphs[@]}"} --out "$OUT/graphs_$variant.json"
            done ;;
        decode-bf16)  # the decode batches that are bound by the SSM state's bytes, with bf16 states (as the peer)
            stage decode_bf16 env JAX_PLATFORMS=cuda PYTHONPATH="$OURS_PATH" python3 benchmarks/generate.py \
                --impls easymamba --shapes "$SHAPES" --batches 64,256 --new "$NEW" --prefill-batches "" \
                --state-dtype bfloat16 --out "$OUT/decode_bf16.json" ;;
        train)
            stage train env JAX_PLATFORMS=cuda PYTHONPATH="$OURS_PATH" python3 benchmarks/train_step.py --batches 8 \
                --packed 1,8 --out "$OUT/train.json" ;;
        tests)
            stage tests env JAX_PLATFORMS=cuda,cpu PYTHONPATH="$OURS_PATH" python3 -m pytest -q -m gpu -p no:cacheprovider -n "${TEST_WORKERS:-6}" \
                tests/test_kernels_pallas.py tests/test_decode_step_pallas.py tests/test_kernels_backward.py ;;
        *) echo "unknown stage $s" >&2 ;;
    esac
done
