"""`dflash serve`: this engine behind an OpenAI-compatible HTTP API.

app.py holds the routes and the server, protocol.py the request and response shapes, answer.py an
answer as chunks or whole, worker.py the one engine thread and its queue, prompting.py the chat
template, reasoning.py / tools.py / reply.py the parsing of a streamed answer into reasoning,
content and tool calls, launch.py the way from flags to a running server. Importing this package
imports none of the web stack (the SGLang/vLLM hand-off only needs auth.py).
"""
