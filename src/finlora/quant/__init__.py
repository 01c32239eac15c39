"""How finlora computes with quantized base weights (bitsandbytes' storage, finlora's compute)."""
