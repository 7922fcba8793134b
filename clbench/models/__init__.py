"""Backbones: open_clip CLIP with LoRA-capable attention, and the embedded tiny model."""
