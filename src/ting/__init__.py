"""Ting (听): a self-hosted server for audio-language models."""

__version__ = "0.1.0"
