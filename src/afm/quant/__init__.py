"""Quantization for CPU deployment: ggml's Q8_0 and Q4_0 formats, GGUF export and import, quantized linears."""
