"""`promptvault serve`: an OpenAI- and Anthropic-compatible HTTP server whose prefix cache is the vault.

The server holds no cache logic of its own: every vault call it makes is in `prefix_cache`
(restore the longest stored prefix before a request, store the new blocks after its answer).
The rest is plumbing: `parse` turns request bodies into one `Generation`, `worker` runs
generations on the one thread that owns MLX, `responses` shapes the answers (OpenAI and
Anthropic, whole or as server-sent events), `app` wires the routes. FastAPI and uvicorn are an
optional extra (`pip install 'promptvault[server]'`), so nothing here is imported by the rest of
the package.
"""
