"""What differs between the transformers releases the library runs on (5.0 to the newest)."""

from __future__ import annotations

from transformers.generation.utils import GenerateDecoderOnlyOutput

#: What transformers calls the KV cache in models' and masks' arguments, `generate`'s keyword arguments and its
#: outputs: 5.24 renamed `past_key_values` to `cache` (the old name stays as a deprecated alias that warns).
CACHE_NAME = "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"
