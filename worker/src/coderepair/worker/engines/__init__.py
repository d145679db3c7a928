"""Inference engines: one interface (`base.Engine`), a transformers and a vLLM implementation."""
