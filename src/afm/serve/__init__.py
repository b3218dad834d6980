"""The OpenAI-compatible server, its metrics and web chat page, and the serving benchmark client."""
