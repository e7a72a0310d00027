#!/usr/bin/env bash
# Submits the dropout study (configs/vertex_hpt.yaml, the Vertex form of the original
# configs/hptuning_config.yaml) as a Vertex AI hyperparameter tuning job.
#
#   PROJECT=my-project REGION=us-central1 BUCKET=my-bucket IMAGE_URI=us-docker.pkg.dev/.../trainer:latest \
#     scripts/submit_vertex_hpt.sh
#
# Each trial runs the container with --dropout-one=... --dropout-two=... and reports its
# validation accuracy per epoch (cloudml-hypertune); its outputs go to gs://$BUCKET/hptuning/<trial>/.
set -euo pipefail

: "${PROJECT:?set PROJECT}" "${REGION:?set REGION}" "${BUCKET:?set BUCKET}" "${IMAGE_URI:?set IMAGE_URI}"
root=$(cd "$(dirname "$0")/.." && pwd)
config=$(mktemp --suffix=.yaml)
trap 'rm -f "$config"' EXIT
sed -e "s|IMAGE_URI|${IMAGE_URI}|g" -e "s|gs://BUCKET/|gs://${BUCKET}/|g" "$root/configs/vertex_hpt.yaml" >"$config"
max_trials=$(awk '/^maxTrialCount:/ {print $2}' "$config")
parallel_trials=$(awk '/^parallelTrialCount:/ {print $2}' "$config")

gcloud ai hp-tuning-jobs create \
  --project="$PROJECT" \
  --region="$REGION" \
  --display-name="mnist_jax_hpt_$(date +%Y%m%d_%H%M%S)" \
  --config="$config" \
  --max-trial-count="$max_trials" \
  --parallel-trial-count="$parallel_trials"
