"""``javisrt serve``: an OpenAI-compatible Videos API server that embeds the pipeline.

    config.py    ServeConfig: limits, sizes, queue, TTL, API key (frozen; built by cli.py)
    request.py   create-request fields -> VideoRequest (+ the pipeline's GenerationConfig), 400s
    jobs.py      Job (the video object), JobQueue (bounded FIFO), JobStore (TTL, records on disk)
    workers.py   WorkerPool: one thread + pipeline per device, per-step progress and cancel, shutdown
    metrics.py   Prometheus metrics in the pool's own registry
    app.py       the FastAPI routes, auth, body cap, error bodies, playground page (static/)
    process.py   ServerProcess: run ``javisrt serve`` as a child process on a free loopback port
    cli.py       the ``serve`` subcommand (argparse + uvicorn)
"""
