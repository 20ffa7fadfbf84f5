#!/usr/bin/env bash
# One device call on a 4 x H200 machine (about 9 minutes): the FSDP2 checks and measurements of issue 16.
#
#   bash benchmarks/fsdp_gpu_run.sh OUT [BUDGET_S]
#
# Assumes opacus on PYTHONPATH and this checkout's root as the working directory:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD
#
# Parts, in order of priority; each has its own time limit, cut to what is left of BUDGET_S (default
# 530 s), so a slow part cannot eat the rest.  After each part everything so far is packed into
# OUT/results.tar.gz (logs, JSON, tables), and OUT/summary.md holds the tables:
#   1. tests/test_fsdp.py on 4 and on 2 ranks (NCCL), side by side             limit 200 s
#   2. phases of one step, Llama-3-8B shape, T 1024, B 2 per GPU, 4 GPUs        limit 150 s
#      (nondp, the four *_fsdp modes, flash_bk_fsdp with Opacus's FSDP optimizer), with the
#      collectives and host synchronisations of each phase
#   3. the same on 2 GPUs (without bk_fsdp)                                     limit 130 s
#   4. scaling: 8 layers, T 2048, global batch 8 on 4, 2 and 1 GPU(s)           limit 70 s each
#   5. the llama-fsdp preset (python -m dpkernels profile) on 4 GPUs at T 1024, if time is left
set -uo pipefail
OUT=${1:?usage: fsdp_gpu_run.sh OUT [BUDGET_S]}
BUDGET=${2:-530}
START=$(date +%s)
WORK=$(mktemp -d /tmp/fsdp_gpu_run.XXXX)
mkdir -p "$OUT"
PHASES="python3 -m torch.distributed.run --standalone"
MODES="nondp ghost_fsdp flash_fsdp bk_fsdp flash_bk_fsdp"

left() { echo $((BUDGET - ($(date +%s) - START))); }

# part NAME LIMIT_S COMMAND...: run COMMAND with min(LIMIT_S, time left) seconds, log to WORK/NAME.log
part() {
    local name=$1 limit=$2; shift 2
    local t=$(left)
    (( t < limit )) && limit=$t
    if (( limit < 20 )); then echo "== $name: skipped (${t} s left)" | tee -a "$WORK/parts.txt"; return; fi
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$WORK/parts.txt"
    tail -n 3 "$WORK/$name.log"
    pack
}

pack() {
    local tables=$(ls "$WORK"/*.json 2>/dev/null)
    if [ -n "$tables" ]; then
        python3 -m dpkernels.profiling.distributed --table $tables > "$WORK/summary.md" 2>&1
        cp "$WORK/summary.md" "$OUT/summary.md"
    fi
    tar czf "$OUT/results.tar.gz" -C "$WORK" .
}

nvidia-smi --query-gpu=name,memory.total --format=csv > "$WORK/gpus.txt" 2>&1
nvidia-smi topo -m >> "$WORK/gpus.txt" 2>&1
python3 -c "import torch, triton, transformers, opacus; print(torch.__version__, triton.__version__, transformers.__version__, opacus.__version__)" >> "$WORK/gpus.txt" 2>&1

# 1. correctness on NCCL: the 4-rank and the 2-rank runs share GPUs 0 and 1 (tiny models)
tests() {
    DPKERNELS_TEST_WORLD=4 python3 -m pytest tests/test_fsdp.py -q -p no:cacheprovider > "$WORK/tests-world4.log" 2>&1 &
    local four=$!
    DPKERNELS_TEST_WORLD=2 python3 -m pytest tests/test_fsdp.py -q -p no:cacheprovider > "$WORK/tests-world2.log" 2>&1
    local two=$?
    wait $four
    local rc=$?
    tail -n 2 "$WORK/tests-world4.log" "$WORK/tests-world2.log"
    return $(( two | rc ))
}
part tests 200 bash -c "$(declare -f tests); WORK=$WORK; tests"

# 2, 3. where a step's time goes: seed 004 (Llama-3-8B shape) at T 1024, B 2 per GPU
# (Opacus's optimizer last on 4 GPUs: the 3-row head has an empty shard there, which makes it fail on CPU)
part phases-8b-4gpu 150 $PHASES --nproc-per-node=4 -m dpkernels.profiling.distributed --count-ops \
    --seq 1024 --batch 2 --modes nondp flash_bk_fsdp ghost_fsdp flash_fsdp bk_fsdp flash_bk_fsdp:opacus --out "$WORK/phases-8b-4gpu.json"
part phases-8b-2gpu 130 $PHASES --nproc-per-node=2 -m dpkernels.profiling.distributed --count-ops \
    --seq 1024 --batch 2 --modes nondp flash_bk_fsdp flash_bk_fsdp:opacus ghost_fsdp flash_fsdp --out "$WORK/phases-8b-2gpu.json"

# 4. scaling at a fixed global batch of 8: 8 layers of Llama-3-8B's width, T 2048
for gpus in 4 2 1; do
    part scaling-${gpus}gpu 70 $PHASES --nproc-per-node=$gpus -m dpkernels.profiling.distributed \
        --layers 8 --seq 2048 --batch $((8 / gpus)) --modes $MODES --out "$WORK/scaling-${gpus}gpu.json"
done

# 5. the preset's records (memory breakdown per phase, plots), with what is left
part preset-4gpu 400 python3 -m dpkernels profile --preset llama-fsdp --gpus 4 --seq 1024 \
    --modes nondp ghost_fsdp flash_bk_fsdp --out "$WORK/preset"

echo "total $(( $(date +%s) - START )) s" | tee -a "$WORK/parts.txt"
pack
cat "$OUT/summary.md" 2>/dev/null
