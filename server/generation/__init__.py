"""Text generation: continuous batching (scheduler), the KV cache, sampling, stop sequences, detokenization."""
