"""Every use finlora makes of a third-party private API (a name with a leading underscore, or a module under one),
one module a library. Each function says what it reaches into and the releases it was checked on; each has a test in
tests/test_compat.py (peft and bitsandbytes: tests/test_compat_dora.py) that fails with the function's name when a
release changes what it relies on, and tests/test_layout.py checks that no module outside this folder names a
private third-party API.

Checked on: torch 2.13 (CPU) and 2.11 (GPU), lightning 2.6.6, hydra-core 1.3.8, transformers 5.17, 5.24 and 5.25,
peft 0.21, bitsandbytes 0.50.2.
"""
