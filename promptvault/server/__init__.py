"""`promptvault serve`: an OpenAI- and Anthropic-compatible HTTP server whose prefix cache is the vault.

The server holds no cache logic of its own: the library's `LiveCaches` gives each request the
longest prefix memory or the vault holds and keeps its answer's cache; `prefix_cache` holds the
rest (which tokens an answered cache holds, pending stores, the vault's store, stats, clear).
The rest is plumbing: `parse` turns request bodies into one `Generation`, `worker` runs
generations on the one thread that owns MLX, `responses` shapes the answers (OpenAI and
Anthropic, whole or as server-sent events), `app` wires the routes. FastAPI and uvicorn are an
optional extra (`pip install 'promptvault[server]'`), so nothing here is imported by the rest of
the package.
"""
