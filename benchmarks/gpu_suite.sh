#!/usr/bin/env bash
# Everything measured on a lent GPU, in one call: the GPU tests, then the benchmarks, each
# writing its JSON and log under $OUT (or ./gpu-results). Wheels missing on that machine
# (gguf, the serving stack) are installed from ./.whl when the folder is there; elsewhere
# install the extras first: pip install -e ".[test,bench,serve,cuda]".
#
#   bash benchmarks/gpu_suite.sh [tests] [attention] [linear] [chain] [quantize] [sampler] [profile] [graphs] [engine] [load]   (default: all)
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
# The package itself, for its `neuron_llm.serve`/`neuron_llm.compile` mapping (no downloads).
python3 -m pip install -q --no-deps --no-index --no-build-isolation -e . || exit 1
steps=${*:-tests attention linear chain quantize sampler profile graphs engine load}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit,temperature.gpu,memory.used --format=csv | tee "$out/gpu.txt"
status=0
run() {  # run NAME COMMAND...: log to $out/NAME.log, keep going on failure
    local name=$1
    shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | grep -v 'it/s]$' > "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    tail -n 25 "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" = 0 ] || status=1
}
for step in $steps; do
    case $step in
        tests)
            # Tests that need tens of GiB run alone: beside parallel workers they would skip.
            run tests python3 -m pytest -q -rs -p no:cacheprovider -n 4 -m "not large_memory" tests/cuda
            run tests_large_memory python3 -m pytest -q -rs -p no:cacheprovider -m large_memory tests/cuda
            ;;
        attention) run attention python3 benchmarks/attention_kernels.py --json "$out/attention.json" ;;
        linear) run linear python3 benchmarks/linear_kernels.py --json "$out/linear.json" ;;
        chain) run chain python3 benchmarks/gemv_chain.py --json "$out/gemv_chain.json" ;;
        quantize) run quantize python3 benchmarks/activation_quantize.py --json "$out/activation_quantize.json" ;;
        sampler) run sampler python3 benchmarks/sampler_cost.py --json "$out/sampler.json" ;;
        profile)
            run profile python3 benchmarks/step_profile.py --formats bf16,int8 --json "$out/step_profile.json"
            run prefill_profile python3 benchmarks/step_profile.py --prompt 4096 --formats bf16,fp8,fp8-all \
                --json "$out/prefill_profile.json"
            ;;
        graphs) run graphs python3 benchmarks/prefill_graphs.py --json "$out/prefill_graphs.json" ;;
        engine) run engine python3 -m neuron_llm.cli bench --json "$out/engine.json" ;;
        load)
            run load python3 benchmarks/throughput_latency.py --rates 2,4,8,16,32 --num-requests 48 \
                --json "$out/throughput_latency.json" --png "$out/throughput_latency.png"
            ;;
        *) echo "unknown step $step" && exit 2 ;;
    esac
done
exit $status
