"""HTTP: the DashScope and OpenAI protocols over FastAPI."""
