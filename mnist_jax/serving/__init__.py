"""Serving a trained model: images checked and scaled (`images`), the model as a jitted forward pass
(`predict`), dynamic batching (`batcher`), and Vertex AI's prediction server (`server`)."""
