"""I/O adapters: the aiohttp glue of a relay worker."""
