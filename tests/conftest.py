"""Shared fixtures: tiny real-architecture VLMs saved like Hub checkpoints, real photos, and a logits helper."""

from __future__ import annotations

import os

import pytest

# the suite's results must not depend on the machine: half-precision layers calibrate in float32 on every CPU
# (tests of the native-bf16 path set TLQ_CPU_BF16=1 themselves; see tlq_hf.calibration.offload.cpu_has_native_bf16)
os.environ["TLQ_CPU_BF16"] = "0"
from _helpers import PROMPTS

from tlq_hf.testing.tiny_models import build_tiny_vlm, make_inputs, sample_images


@pytest.fixture(scope="session")
def tiny_vlm_dirs(tmp_path_factory) -> dict[str, str]:
    """Lazily built ``{family: checkpoint dir}``; each family is built once per session."""
    root = tmp_path_factory.mktemp("tiny_vlms")

    class _Dirs(dict):
        def __missing__(self, family):
            self[family] = build_tiny_vlm(family, root / family)
            return self[family]

    return _Dirs()


@pytest.fixture(scope="session")
def batch_for(tiny_vlm_dirs):
    """``batch_for(family)``: processor-built inputs for two real photos and two prompts."""
    from transformers import AutoProcessor

    cache = {}

    def make(family):
        if family not in cache:
            processor = AutoProcessor.from_pretrained(tiny_vlm_dirs[family])
            cache[family] = make_inputs(processor, sample_images(2), PROMPTS)
        return cache[family]

    return make
