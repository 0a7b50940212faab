"""Privacy tools: PII scanning and redaction, DP-SGD for adapters with an RDP accountant, and a
canary memorisation audit."""
