"""The review app's routers: `pages` (HTML) and `api` (JSON, documented by /openapi.json)."""
