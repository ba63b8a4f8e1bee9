"""Serving over HTTP: the engine thread (loop), OpenAI's API in harmony terms (protocol), the bodies sent
(responses) and the FastAPI app (app). `python -m eval.serve` runs it."""
