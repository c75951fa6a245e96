"""`mlx-llama serve`: an OpenAI-compatible HTTP server in front of one engine thread.

Split by role, as llama.cpp's server is:

- `engine_api`   the `BatchEngine` Protocol the server needs from an engine
  (`mlx_llama.generation.engine.Engine` implements it)
- `worker`       the engine thread: owns MLX, takes submissions and cancels from a task queue
- `schemas`      pydantic request bodies (validation) and response bodies
- `prompts`      an OpenAI request → a `GenerationRequest` (chat template, limits, sampling)
- `structured`   the constraint a chat answer follows (`response_format` or `tools`)
- `tools`        tool calls: the tools' prompt and grammar, the answer's text → `tool_calls`
- `completion`   token events → text pieces (detokenizing, stop strings, logprobs, usage)
- `streaming`    server-sent events as OpenAI's clients parse them
- `errors`       OpenAI-style error objects for every failure
- `security`     bearer-token auth and CORS
- `metrics`      Prometheus counters and gauges
- `routes`       the endpoints; `app` assembles them
"""
