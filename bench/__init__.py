"""The benchmark: what flushgate adds to a streamed answer, against the engine direct, nginx and LiteLLM."""
