"""The HTTP API at /sdapi/v1 (A1111-compatible) and queued jobs."""
