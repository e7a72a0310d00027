#!/usr/bin/env bash
# GPU benchmark: the real training job and vectorized tuning trials on one GPU, as one short command.
#
#   bash scripts/gpu_bench.sh [EPOCHS]        # from the repository root, on the GPU machine
#
# Expects Python 3.12 with JAX and its CUDA plugin, flax, optax, orbax-checkpoint and h5py installed,
# no network, real MNIST at data/mnist.pkl (carried along), and any other package the trainer
# imports as wheels in .whl/ (tensorboardX, PyYAML, cloudml-hypertune; see README, Performance).
# Prints a table: the default job's median steady-state epoch, first epoch and wall time, test
# accuracy, and the epoch time of K trials trained together, for K = 1, 4 and 16.
set -euo pipefail

epochs=${1:-5}
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mnist-jax-site .whl/*.whl
  export PYTHONPATH="/tmp/mnist-jax-site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" CLOUD_ML_HP_METRIC_FILE=/dev/null
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export JAX_COMPILATION_CACHE_DIR="$work/xla-cache"

python3 -c 'import jax; print("devices:", jax.devices())'
start=$(date +%s.%N)
python3 -m mnist_jax.train --train-file data/mnist.pkl --epochs "$epochs" --job-dir "$work/job" >"$work/job.log"
end=$(date +%s.%N)

for k in 1 4 16; do
  python3 - "$work" "$k" "$epochs" <<'PY'
import json, sys
work, k, epochs = sys.argv[1], int(sys.argv[2]), sys.argv[3]
group = [{"argv": ["--train-file", "data/mnist.pkl", "--epochs", epochs, "--job-dir", f"{work}/k{k}-{i}",
                   f"--dropout-one={0.1 + 0.4 * i / max(k - 1, 1):.3f}"], "env": {}} for i in range(k)]
json.dump(group, open(f"{work}/group-{k}.json", "w"))
PY
  python3 -m mnist_jax.multitrial "$work/group-$k.json" >"$work/group-$k.log"
done

python3 - "$work" "$epochs" "$start" "$end" <<'PY'
import json, statistics, sys
work, epochs, start, end = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
def records(job_dir):
    return [json.loads(line) for line in open(f"{job_dir}/metrics.jsonl")]
job = records(f"{work}/job")
median = statistics.median(r["epoch_time_s"] for r in job[1:])
flops = 60000 * 3.21e6 + 10000 * 1.337e6
print(f"\n{'measure':<44}{'value':>12}")
print(f"{'median steady-state epoch (s)':<44}{median:>12.4f}")
print(f"{'first epoch, compile included (s)':<44}{job[0]['epoch_time_s']:>12.3f}")
print(f"{f'job wall time, {epochs} epochs (s)':<44}{end - start:>12.1f}")
print(f"{'test accuracy':<44}{job[-1]['val_accuracy']:>12.4f}")
print(f"{'achieved GFLOP/s':<44}{flops / median / 1e9:>12.0f}")
for k in (1, 4, 16):
    trial = records(f"{work}/k{k}-0")
    epoch = statistics.median(r["epoch_time_s"] for r in trial[1:])
    print(f"{f'{k} trials in one program: epoch (s)':<44}{epoch:>12.4f}")
    print(f"{f'{k} trials in one program: trials x epochs / s':<44}{k / epoch:>12.1f}")
PY
