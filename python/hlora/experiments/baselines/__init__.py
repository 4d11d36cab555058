"""Baselines hlora is compared with (the LoRA variants are PEFT configurations; EWC-LoRA lives here)."""
