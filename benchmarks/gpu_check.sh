#!/usr/bin/env bash
# The CUDA checks and GPU benchmark figures of BENCHMARKS.md ("GPU: NVIDIA H100 and H200"), in one run on a CUDA
# machine with torch installed:
#
#     bash benchmarks/gpu_check.sh            # writes benchmarks/results/gpu/new/ (or $OUT when set)
#
# Needs transformers >= 5.19: if .whl/ holds wheels (e.g. `pip download --no-deps transformers==5.24.0
# -d .whl` on a machine with a registry) or zipped packages (`python benchmarks/pack_transformers.py`:
# transformers without the model families we do not use, small enough to carry beside the demo
# models), they are installed first (for machines without a registry).
# Each step has its own time limit, so one failing step leaves the others' results; the steps run in
# order of importance. The full set outlasts one 10-minute device call (its limits add up to ~16
# minutes); `TREE_GAMMAS="" HF_GAMMAS=5,4,3 HF_BATCH_GAMMAS="" SKIP_BF16_TREES=1` took 343 s in an
# earlier run on an H100 (its bf16 step failing at once; ~90 s more when it runs). Environment: TREE_GAMMAS (chains and
# trees beside the beams in the float32 step, default 3,4,5; "" for beams only), HF_GAMMAS and
# HF_BATCH_GAMMAS (the bf16 bench_hf step, default 3,4,5 and 3,4), SKIP_BF16_TREES=1 skips the last step,
# ONLY (a comma-separated list of step names: run just those, e.g. ONLY=env,tests,wide_beams_adaptive).
set -u
OUT=${OUT:-benchmarks/results/gpu/new}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/specbeam_site .whl/*.whl
    export PYTHONPATH=/tmp/specbeam_site${PYTHONPATH:+:$PYTHONPATH}
fi
for z in .whl/*.zip; do  # an unpacked package zipped whole (a wheel trimmed to fit a size limit)
    [ -e "$z" ] && python3 -m zipfile -e "$z" /tmp/specbeam_site && export PYTHONPATH=/tmp/specbeam_site${PYTHONPATH:+:$PYTHONPATH}
done
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then
        return 0
    fi
    echo "=== $name ($(date -u +%T), limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - t0)) s"
}

{
    step env 20 python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used,utilization.gpu --format=csv
    step tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
    # where a pass goes
    step profile_pass 90 python3 benchmarks/profile_pass.py --device cuda --rounds 3 --out "$OUT"
    step trees_beams_fp32 190 python3 benchmarks/bench_trees_beams.py --device cuda --dtype float32 \
        --gammas "${TREE_GAMMAS-3,4,5}" --beams 2,4,8 --repeats 2 --out "$OUT"
    # the beams' shared prefix read once against once per beam, and HF, taking turns
    step shared_prefix 120 python3 benchmarks/bench_shared_prefix.py --device cuda --rounds 2 --out "$OUT"
    # beam search B = 4 with a wider, deeper draft tree at a fixed depth: on a launch-bound GPU the
    # target's pass costs about the same whatever the tree holds
    step wide_beams 70 python3 benchmarks/bench_trees_beams.py --device cuda --dtype float32 \
        --gammas "" --beams 4 --beam-depth 4 --beam-candidates 12 --no-beam-adaptive --repeats 2 --out "$OUT/wide_beams"
    # the same width with the adaptive depth (on an H100 it chose the fixed step's depth, 2.84 steps a pass)
    step wide_beams_adaptive 70 python3 benchmarks/bench_trees_beams.py --device cuda --dtype float32 \
        --gammas "" --beams 4 --beam-depth 4 --beam-candidates 12 --repeats 2 --out "$OUT/wide_beams_adaptive"
    # deeper still at a fixed depth: how many beam steps a pass covers when the tree costs ~nothing more
    step deep_beams 80 python3 benchmarks/bench_trees_beams.py --device cuda --dtype float32 \
        --gammas "" --beams 4 --beam-depth 6 --beam-candidates 16 --no-beam-adaptive --repeats 2 --out "$OUT/deep_beams"
    # the bf16 greedy rows that ran at 29-65 % of their bound in earlier runs, each γ in its own process
    # (whether the slowness follows the rows' order within one process; at 90 s each, an earlier run's
    # stopped during the HF assisted rows, before specbeam's)
    for g in 4 5; do
        step "hf_bf16_gamma$g" 180 python3 benchmarks/bench_hf.py --device cuda --dtype bfloat16 --modes greedy \
            --gammas "$g" --batch-gammas "" --max-new-tokens 64 --repeats 2 --out "$OUT/hf_bf16_gamma$g"
    done
    step hf_bf16 170 python3 benchmarks/bench_hf.py --device cuda --dtype bfloat16 --modes greedy \
        --gammas "${HF_GAMMAS-3,4,5}" --batch-gammas "${HF_BATCH_GAMMAS-3,4}" --max-new-tokens 64 --repeats 2 --out "$OUT"
    if [ -z "${SKIP_BF16_TREES:-}" ]; then
        step trees_beams_bf16 110 python3 benchmarks/bench_trees_beams.py --device cuda --dtype bfloat16 \
            --gammas 5 --beams 4 --repeats 2 --out "$OUT"
    fi
} 2>&1 | tee "$OUT/gpu_check.log"
rm -f "$OUT"/*.png "$OUT"/*/*.png  # plots are redrawn from the JSON
# the tool that fetches results takes at most 8 files: the JSON of every step in one archive beside the log
(cd "$OUT" && find . -name '*.json' | tar czf results.tar.gz -T - && find . -name '*.json' -delete)
