import json

import pytest

from tlq_hf import TLQConfig


def test_defaults_and_json_round_trip():
    cfg = TLQConfig()
    d = cfg.to_dict()
    assert d["quant_method"] == "tlq" and d["bits"] == 4 and d["group_size"] == 128
    json.dumps(d)  # JSON-serialisable
    again = TLQConfig.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5}, "bits=5"),
        ({"group_size": 0}, "group_size=0"),
        ({"group_size": "128"}, "group_size='128'"),
        ({"act_bits": 4}, "act_bits=4"),
        ({"solver": "sgd"}, "solver='sgd'"),
        ({"importance": "grad"}, "importance='grad'"),
        ({"token_fraction": 0}, "token_fraction=0"),
        ({"gamma": 0}, "gamma=0"),
        ({"importance_clip": (2, 3)}, "importance_clip"),
        ({"num_samples": 0}, "num_samples=0"),
        ({"method": "magic"}, "method='magic'"),
        ({"save_format": "gguf"}, "save_format"),
        ({"ignore": "lm_head"}, "list of valid regex"),
        ({"ignore": ["("]}, "ignore=['(']"),
        ({"sym": False}, "sym=True, or save_format='tlq'"),
        ({"bitz": 4}, "unknown argument"),
    ],
)
def test_bad_values_raise_with_a_fix(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace("[", r"\[")):
        TLQConfig(**kwargs)


def test_asymmetric_is_allowed_in_native_format():
    assert TLQConfig(sym=False, save_format="tlq").scheme.sym is False


def test_from_dict_drops_unknown_keys_from_newer_versions(caplog):
    cfg = TLQConfig.from_dict({"quant_method": "tlq", "bits": 3, "future_field": 1})
    assert cfg.bits == 3
    assert "future_field" in caplog.text


def test_registered_with_transformers():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from tlq_hf import TLQHfQuantizer

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["tlq"] is TLQConfig
    assert AUTO_QUANTIZER_MAPPING["tlq"] is TLQHfQuantizer
    assert TLQHfQuantizer.requires_calibration is False


def test_dataset_is_shared_not_copied_or_serialised():
    import copy

    rows = [{"image": None, "text": "x"}]
    cfg = TLQConfig(dataset=rows, processor=object())
    clone = copy.deepcopy(cfg)
    assert clone.dataset is rows and clone.processor is cfg.processor
    assert "dataset" not in cfg.to_dict() and "processor" not in cfg.to_dict()
    assert cfg.to_dict()["method"] == "tlq"
