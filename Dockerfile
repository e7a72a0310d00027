# CPU training container for Vertex AI custom jobs and tuning trials.
# The entrypoint is the trainer: Vertex's `args` (and a trial's --name=value flags) are its flags.
# Dependencies come from requirements/train.lock (pinned, with hashes; scripts/lock.sh refreshes it).
#   docker build -t "$IMAGE_URI" . && docker push "$IMAGE_URI"
FROM python:3.12-slim
ENV PYTHONUNBUFFERED=1
WORKDIR /opt/mnist-jax
COPY requirements/train.lock ./requirements.lock
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY mnist_jax ./mnist_jax
RUN pip install --no-cache-dir --no-deps .
ENTRYPOINT ["python", "-m", "mnist_jax.train"]
CMD ["--epochs=20", "--batch-size=128"]
