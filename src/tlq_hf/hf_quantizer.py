"""``TLQHfQuantizer``: the only module that speaks transformers' quantizer hooks.

Two paths through ``from_pretrained``:

* **Quantize on load** (a full-precision checkpoint plus ``quantization_config=TLQConfig(...)``): the
  weights load as usual; after loading, the calibration pipeline quantizes the decoder and swaps in
  packed modules. With the default ``save_format``, ``config.quantization_config`` then becomes the
  equivalent compressed-tensors config so that ``save_pretrained`` writes a checkpoint that reloads
  without tlq_hf.
* **Pre-quantized native checkpoint** (``quant_method: "tlq"`` in config.json): target linears are
  swapped for empty packed modules before loading, filled by transformers, then validated.

Hook signatures differ between transformers 4.57 and 5.x; every hook here accepts both.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from transformers.quantizers.base import HfQuantizer

from .calibration import quantize_model
from .calibration.offload import with_disk_layers_loaded
from .config import TLQConfig
from .formats import FORMATS, format_of
from .formats.card import attach_card_writer
from .nn import prepare_kernels
from .version import __version__

__all__ = ["TLQHfQuantizer"]

logger = logging.getLogger(__name__)


def _resolve_checkpoint_files(config) -> list[str]:
    """The safetensors files of the checkpoint ``config`` came from (transformers 4.57 does not pass them)."""
    from transformers.utils import cached_file

    source = getattr(config, "_name_or_path", "") or ""
    if not source:
        return []
    index = cached_file(source, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False)
    if index:
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [cached_file(source, shard) for shard in shards]
    single = cached_file(source, "model.safetensors", _raise_exceptions_for_missing_entries=False)
    return [single] if single else []


class TLQHfQuantizer(HfQuantizer):
    """transformers quantizer for :class:`~tlq_hf.TLQConfig` (quant_method ``"tlq"``)."""

    requires_calibration = False  # in transformers 5, True would mean "pre-quantized checkpoints only"
    requires_parameters_quantization = False  # transformers 4.57: weights load as they are
    quantization_config: TLQConfig

    def __init__(self, quantization_config: TLQConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._packed_names: list[str] = []
        #: Put the model back if calibration fails (``tlq_hf.quantize``: the caller keeps the model).
        self.undo_on_failure = False

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("from_tf") or kwargs.get("from_flax"):
            raise ValueError("tlq_hf quantizes PyTorch checkpoints only.")

    def update_torch_dtype(self, dtype: torch.dtype | None) -> torch.dtype | None:  # transformers 4.57 name
        return dtype

    def _process_model_before_weight_loading(self, model, **kwargs: Any):
        if self.pre_quantized:
            cfg = self.quantization_config
            files = kwargs.get("checkpoint_files") or _resolve_checkpoint_files(model.config)
            dtype = kwargs.get("dtype") or model.dtype
            # a checkpoint reaches this quantizer through its quant_method ("tlq"): its format's loader hooks
            fmt = format_of(cfg.quant_method)
            self._packed_names = fmt.prepare_load(model, cfg, dtype, [str(f) for f in files])
        return model

    def _process_model_after_weight_loading(self, model, **kwargs: Any):
        cfg = self.quantization_config
        if self.pre_quantized:
            format_of(cfg.quant_method).check_loaded(model, self._packed_names)
            logger.info("tlq_hf: packed layers per kernel: %s", prepare_kernels(model))  # repack once, at load
            attach_card_writer(model)
            return model
        model.tlq_report = quantize_model(model, cfg, undo=self.undo_on_failure)
        logger.info("tlq_hf: packed layers per kernel: %s", prepare_kernels(model))
        attach_card_writer(model)  # save_pretrained / push_to_hub write the model card
        FORMATS[cfg.save_format].finish(model, cfg)
        return model

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        if safe_serialization is False:
            logger.warning("tlq_hf saves safetensors only; pass safe_serialization=True.")
            return False
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def get_state_dict_and_metadata(self, model, safe_serialization: bool | None = None):
        """The state dict to save (in-memory names; transformers renames them) and safetensors metadata."""
        metadata = {"tlq_provenance": json.dumps(self.provenance(model), sort_keys=True)}
        cfg = self.quantization_config
        # a pre-quantized model was loaded from (and is saved in) the format it was written in
        state = None if self.pre_quantized else FORMATS[cfg.save_format].state_dict(model, cfg)
        return with_disk_layers_loaded(model, state), metadata

    def provenance(self, model) -> dict[str, Any]:
        """How this model was quantized: tool, version, settings and the run's summary (no timings: the same
        model, data, config and seed give the same checkpoint bytes)."""
        report = getattr(model, "tlq_report", None)
        return {
            "tool": "tlq_hf",
            "version": __version__,
            "config": self.quantization_config.to_dict(),
            "summary": report.summary(timing=False) if report is not None else None,
            "recipe": vars(report.recipe) if report is not None and report.recipe is not None else None,
            "calibration": {"samples": report.samples, "tokens": report.tokens} if report is not None else None,
        }
