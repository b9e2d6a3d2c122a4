"""Helpers for testing persona-eval itself: a tiny trainable model with a known, planted persona effect
(tiny_model), a stand-in OpenAI-compatible server (standin) and a local vLLM server on the CPU
(vllm_server)."""
