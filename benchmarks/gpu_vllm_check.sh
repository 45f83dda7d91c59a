#!/usr/bin/env bash
# specbeam inside vLLM on a CUDA machine with vLLM 0.32 (`pip install vllm==0.32.0`, then
# `pip install -e ".[test]"` here): the checks and figures the CPU cannot give, in one run.
#
#     TARGET=/models/Qwen2.5-7B-Instruct DRAFT=/models/Qwen2.5-0.5B-Instruct bash benchmarks/gpu_vllm_check.sh
#
# TARGET and DRAFT are local model folders with one vocabulary (default: the demo pair, which runs
# anywhere but is too small to show a GPU's speed). Writes $OUT (default benchmarks/results/gpu/vllm/):
#   tests.log              the vLLM tests on this machine (greedy identity with spec-off, the sampled
#                          distribution test, disconnects, KV blocks back to idle, device checks);
#   greedy.json, .log      spec-off, vLLM draft_model and specbeam at concurrency 1, 8, 32, 128, greedy
#                          (outputs compared with spec-off's), output tokens/s;
#   sampled.json, .log     the same at temperature 0.8;
#   cheap_target.json      the draft as its own target: where speculation cannot pay, specbeam should
#                          step aside (draft length 0) and stay near spec-off.
# Each step has a time limit, so one failure leaves the others' results.
set -u
OUT=${OUT:-benchmarks/results/gpu/vllm}
TARGET=${TARGET:-specbeam_hf/demo_models/target}
DRAFT=${DRAFT:-specbeam_hf/demo_models/draft}
LEVELS=${LEVELS:-1,8,32,128}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python -c "import torch, vllm; assert torch.cuda.is_available(), 'no CUDA device'; print('vLLM', vllm.__version__, torch.cuda.get_device_name())" || exit 1

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%T), limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - t0)) s"
}

BENCH=(python benchmarks/bench_vllm.py --target "$TARGET" --draft "$DRAFT" --concurrency "$LEVELS"
       --configs spec-off,vllm-draft_model,specbeam --requests-per-level 128 --min-waves 4 --rounds 2
       --max-model-len 4096 --log-dir "$OUT/logs")
step tests 1800 python -m pytest -q -rs tests/test_vllm_config.py tests/test_vllm_server.py tests/test_vllm_sampling.py \
    2>&1 | tee "$OUT/tests.log"
step greedy 1800 "${BENCH[@]}" --out "$OUT/greedy.json" 2>&1 | tee "$OUT/greedy.log"
step sampled 1800 "${BENCH[@]}" --temperature 0.8 --out "$OUT/sampled.json" 2>&1 | tee "$OUT/sampled.log"
step cheap_target 1800 python benchmarks/bench_vllm.py --target "$DRAFT" --draft "$DRAFT" --concurrency "$LEVELS" \
    --configs spec-off,vllm-draft_model,specbeam --requests-per-level 128 --min-waves 4 --rounds 2 \
    --max-model-len 4096 --log-dir "$OUT/logs" --out "$OUT/cheap_target.json" 2>&1 | tee "$OUT/cheap_target.log"
