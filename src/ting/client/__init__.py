"""A stand-alone Python client for Ting (imports nothing from the server)."""
