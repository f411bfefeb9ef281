"""Per-family declarations mapping HF decoder modules to kernel-backed ones."""
