"""`ondevice-lora serve`: an OpenAI-compatible HTTP server for the base model and its adapters."""
