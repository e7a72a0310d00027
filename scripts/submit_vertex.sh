#!/usr/bin/env bash
# Submits the trainer as a Vertex AI custom job: what `gcloud ml-engine jobs submit training` was.
#
#   PROJECT=my-project REGION=us-central1 BUCKET=my-bucket IMAGE_URI=us-docker.pkg.dev/.../trainer:latest \
#     scripts/submit_vertex.sh [cpu|gpu|tpu] [extra trainer flags...]
#
# IMAGE_URI is the Dockerfile image (cpu) or the Dockerfile.gpu image (gpu); for tpu, an image with
# the `tpu` extra. The job dir (config.json, metrics.jsonl, model.h5, logs/, checkpoints/) is
# gs://$BUCKET/jobs/<job name>; rerunning a preempted job with the same --job-dir resumes it.
set -euo pipefail

accelerator=${1:-cpu}
shift || true
: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}" "${IMAGE_URI:?set IMAGE_URI}"

job_name="mnist_jax_$(date +%Y%m%d_%H%M%S)"
case "$accelerator" in
  cpu) machine="machine-type=n1-standard-8" ;;
  gpu) machine="machine-type=n1-standard-8,accelerator-type=NVIDIA_TESLA_T4,accelerator-count=1" ;;
  tpu) machine="machine-type=ct5lp-hightpu-4t,accelerator-type=TPU_V5_LITEPOD,accelerator-count=4" ;;
  *) echo "usage: $0 [cpu|gpu|tpu] [trainer flags...]" >&2; exit 2 ;;
esac

args="--train-file=gs://${BUCKET}/data/mnist.pkl,--job-dir=gs://${BUCKET}/jobs/${job_name}"
for flag in "$@"; do
  args="${args},${flag}"
done

gcloud ai custom-jobs create \
  --project="$PROJECT" \
  --region="$REGION" \
  --display-name="$job_name" \
  --worker-pool-spec="${machine},replica-count=1,container-image-uri=${IMAGE_URI}" \
  --args="$args"
