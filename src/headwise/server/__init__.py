"""``headwise serve``: an OpenAI-compatible server with continuous batching over per-head KV caches.

``scheduler.py`` owns the model in one thread (admission from real KV bytes, chunked prefill, one batched
decode step for every running request); ``app.py`` is the FastAPI front (optional extra ``headwise[serve]``);
``protocol.py`` declares the OpenAI protocol as pydantic models; ``http.py`` runs uvicorn with a draining
shutdown.
"""

from headwise.server.scheduler import Event, GenRequest, Metrics, Scheduler

__all__ = ["Event", "GenRequest", "Metrics", "Scheduler"]
