"""tlq_hf: TLQ quantization of vision-language models as a Hugging Face Transformers quantizer.

``import tlq_hf`` registers quant_method ``"tlq"`` (:class:`TLQConfig`, :class:`TLQHfQuantizer`) with
transformers, so ``from_pretrained(..., quantization_config=TLQConfig(...))`` quantizes on load, and adds the
per-expert key merges that a few MoE model types lack (:mod:`tlq_hf.formats.expert_keys`).
"""

from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from .api import TLQQuantizer, quantize
from .config import TLQConfig
from .formats.expert_keys import register_expert_merges
from .hf_quantizer import TLQHfQuantizer
from .qtypes import QuantScheme
from .version import __version__

__all__ = ["TLQConfig", "TLQHfQuantizer", "TLQQuantizer", "QuantScheme", "quantize", "__version__"]


def _register() -> None:
    """Register quant_method "tlq" with transformers (idempotent)."""
    if "tlq" not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config("tlq")(TLQConfig)
    if "tlq" not in AUTO_QUANTIZER_MAPPING:
        register_quantizer("tlq")(TLQHfQuantizer)
    register_expert_merges()  # MoE types whose fused-expert mapping cannot read per-expert keys


_register()
