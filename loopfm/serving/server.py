"""`loopfm serve`: the scorer behind HTTP JSON (FastAPI on uvicorn).

``GET /health`` -> 200 ``{"status": "ok", "model": ..., "store": "ok"}`` (503 with ``"store":
"down"`` when the store cannot be reached). ``POST /score`` -> 200 ``{"scores": [...],
"sequence_length": n}``; 400 ``{"error": reason}`` for a malformed request; 503 ``{"error": ...}``
when the store is down. The handlers are ``async`` and score in the event loop: a request is a
few milliseconds of CPU, and one process per core is the way to scale.
"""
# (no `from __future__ import annotations`: FastAPI reads the handlers' annotations as objects)

import json

from loopfm.serving.scorer import RequestError, Scorer
from loopfm.serving.store import StoreUnavailable


def make_app(scorer: Scorer):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI(title="LoopFM VM scorer", version="1")
    name = scorer.bundle.manifest["name"]

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            if scorer.store is not None:
                scorer.store.ping()
        except StoreUnavailable as err:
            return JSONResponse({"status": "degraded", "model": name, "store": "down", "error": str(err)}, 503)
        return JSONResponse({"status": "ok", "model": name, "store": "ok" if scorer.store else "none"})

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return JSONResponse({"error": f"the request body is not JSON: {err}"}, 400)
        try:
            return JSONResponse(scorer.score(payload))
        except RequestError as err:
            return JSONResponse({"error": str(err)}, 400)
        except StoreUnavailable as err:
            return JSONResponse({"error": f"the timeline store is unavailable: {err}"}, 503)

    return app


def serve(scorer: Scorer, host: str = "127.0.0.1", port: int = 8080, log_level: str = "warning") -> None:
    import uvicorn

    uvicorn.run(make_app(scorer), host=host, port=port, log_level=log_level)
