"""Integrations with other libraries: ``memlayers.integrations.hf`` (Hugging Face transformers)."""
