"""vllm.distributed of the test double (vLLM 0.33.0): only parallel_state."""
