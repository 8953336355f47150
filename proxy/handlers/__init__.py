"""The aiohttp handlers: operations (health, readiness, metrics, models), admin, and the proxy path."""
