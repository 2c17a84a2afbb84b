"""An OpenAI-compatible HTTP server for one loaded model (`offload-serve`): Starlette routes (app), request
checks (schema), OpenAI's response bodies (responses), one worker thread behind a queue (worker), Prometheus
metrics (metrics), uvicorn with graceful stops (server)."""
