"""Weight-only int8 / int4 quantization: the stored format (formats), GPTQ (gptq), quantized linear
modules and the per-device kernel choice (kernels), and quantizing / saving / loading whole models (model)."""
