"""Integrations with other libraries: ``memlayers.integrations.hf`` (Hugging Face transformers) and
``memlayers.integrations.lmeval`` (lm-evaluation-harness)."""
