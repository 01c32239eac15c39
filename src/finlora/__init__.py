"""finlora: fine-tune quantized LLMs with LoRA and DoRA on FinLoRA's financial tasks (Hydra + Lightning).

Known-harmless library messages are silenced here, by their text and at their logger, before any
submodule imports those libraries; every other message still shows.
"""

import logging

# bitsandbytes, on import on CPUs with AVX512-BF16: an optional kernel package (`kernels`) is absent, and its
# own fallback runs instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward" not in record.getMessage())
# bitsandbytes, on every 8-bit matmul of a non-fp16 input (thousands of lines a run): the cast it announces is
# expected. A logger's filter sees only that logger's own records, not its children's, so it goes on the logger
# bitsandbytes names after the module that logs (a name only: nothing of bitsandbytes is imported or touched).
logging.getLogger("bitsandbytes.autograd._functions").addFilter(
    lambda record: "inputs will be cast" not in record.getMessage())
# Lightning, in every run: advertising for its cloud services (litlogger, litmodels).
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not record.getMessage().startswith("💡 Tip"))
