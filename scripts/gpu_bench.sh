#!/usr/bin/env bash
# GPU benchmark, one short command: the training job, K lanes for K = 1, 4, 16 and 64, the seed's
# study widened to 64 trials in 64 lanes, and the prediction server.
#
#   bash scripts/gpu_bench.sh [EPOCHS] [TRAIN_FILE]     # from the repository root, on the GPU machine
#
# LANES (default "4 16 64"), STUDY_TRIALS (64) and STUDY_EPOCHS (20) resize it, for a dry run on a CPU.
#
# Expects Python 3.12 with JAX and its CUDA plugin, flax, optax, orbax-checkpoint, h5py, PyYAML and
# matplotlib installed, no network, real MNIST at TRAIN_FILE (default data/mnist.pkl; a gzipped pickle
# works too), and any other package the project imports as wheels in .whl/ (docs/performance.md says how to bring them).
# Prints a table: the job's median steady-state epoch, first epoch, wall time and accuracy; each lane
# count's epoch; the 64-trial study's wall time from command to study.json; then the serving table.
set -euo pipefail

epochs=${1:-5}
train_file=${2:-data/mnist.pkl}
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mnist-jax-site .whl/*.whl
  export PYTHONPATH="/tmp/mnist-jax-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" CLOUD_ML_HP_METRIC_FILE=/dev/null PYTHONUNBUFFERED=1
work=$(mktemp -d)
# LOG_DIR, when set, receives every stage's log (kept even when a stage fails).
trap 'if [ -n "${LOG_DIR:-}" ]; then cp "$work"/*.log "$LOG_DIR"/ 2>/dev/null || true; fi; rm -rf "$work"' EXIT
export JAX_COMPILATION_CACHE_DIR="$work/xla-cache"

python3 -c 'import jax; print("devices:", jax.devices(), "jax", jax.__version__)'
seconds() { date +%s.%N; }

start=$(seconds)
python3 -m mnist_jax.train --train-file "$train_file" --epochs "$epochs" --job-dir "$work/job" >"$work/job.log"
job_wall=$(python3 -c "print($(seconds) - $start)")

lanes=${LANES:-4 16 64}
study_trials=${STUDY_TRIALS:-64}
study_epochs=${STUDY_EPOCHS:-20}
for k in $lanes; do
  python3 -m mnist_jax.tune run --config configs/hptuning_config.yaml --job-dir "$work/lanes-$k" \
    --max-trials "$k" --vectorize "$k" -- --train-file "$train_file" --epochs "$epochs" \
    --checkpoint-every "$epochs" >"$work/lanes-$k.log"
done

# The seed's study (configs/hptuning_config.yaml: both dropout rates, reverse log) widened to 64 trials
# of the seed's 20 epochs in 64 lanes, end to end: start-up, 1,280 trial-epochs, every trial's outputs.
start=$(seconds)
python3 -m mnist_jax.tune run --config configs/hptuning_config.yaml --job-dir "$work/study" \
  --max-trials "$study_trials" --vectorize "$study_trials" -- --train-file "$train_file" \
  --epochs "$study_epochs" >"$work/study.log"
study_wall=$(python3 -c "print($(seconds) - $start)")

python3 - "$work" "$epochs" "$job_wall" "$study_wall" "$lanes" "$study_trials" "$study_epochs" <<'PY'
import json, statistics, sys
work, epochs, job_wall, study_wall = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
lanes, trials, study_epochs = [int(k) for k in sys.argv[5].split()], int(sys.argv[6]), int(sys.argv[7])
def records(job_dir):
    return [json.loads(line) for line in open(f"{job_dir}/metrics.jsonl")]
def steady(rows):
    return statistics.median(r["epoch_time_s"] for r in rows[1:])
job = records(f"{work}/job")
flops = 60000 * 3.21e6 + 10000 * 1.337e6
one = steady(job)
print(f"\n{'measure':<52}{'value':>12}")
print(f"{'job: median steady-state epoch (s)':<52}{one:>12.4f}")
print(f"{'job: first epoch, compile included (s)':<52}{job[0]['epoch_time_s']:>12.3f}")
print(f"{f'job: wall time, {epochs} epochs (s)':<52}{job_wall:>12.1f}")
print(f"{'job: test accuracy':<52}{job[-1]['val_accuracy']:>12.4f}")
print(f"{'job: achieved GFLOP/s':<52}{flops / one / 1e9:>12.0f}")
print(f"{'lanes 1 (the job): epoch (s)':<52}{one:>12.4f}")
for k in lanes:
    epoch = steady(records(f"{work}/lanes-{k}/trial-1"))
    print(f"{f'lanes {k}: epoch (s), all lanes':<52}{epoch:>12.4f}")
    print(f"{f'lanes {k}: epoch / one lane':<52}{epoch / one:>12.2f}")
    print(f"{f'lanes {k}: trial-epochs per second':<52}{k / epoch:>12.1f}")
study = json.load(open(f"{work}/study/study.json"))
print(f"{f'study, {trials} trials x {study_epochs} epochs in {trials} lanes: wall (s)':<52}{study_wall:>12.1f}")
print(f"{'study: trials succeeded':<52}{sum(t['status'] == 'SUCCEEDED' for t in study['trials']):>12}")
print(f"{'study: best accuracy':<52}{study['best']['metric']:>12.4f}")
print(f"{'study: median lane epoch (s)':<52}{steady(records(f'{work}/study/trial-1')):>12.4f}")
PY

if python3 -c 'import aiohttp, orjson, starlette, uvicorn' 2>/dev/null; then
  python3 scripts/bench_serve.py --model "$work/job/model.h5" --requests "${SERVE_REQUESTS:-2000}"
fi
