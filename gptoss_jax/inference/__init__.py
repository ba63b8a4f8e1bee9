"""Generation: the engine (jitted prefill and decode over a static-shape KV cache) and sampling."""
