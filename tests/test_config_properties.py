"""Property-based: any ``TLQConfig`` arguments give a valid config (which round-trips through JSON) or a
``ValueError`` naming the field and its allowed values; never a ``TypeError`` or a half-valid config."""

from __future__ import annotations

import json
import logging

from hypothesis import given, settings
from hypothesis import strategies as st

from tlq_hf import TLQConfig
from tlq_hf.config import _SERIALIZED, CHOICES, RULES, SCHEME_FIELDS

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.one_of(st.text(max_size=4), st.integers(), st.floats()), max_size=3),
    st.tuples(st.floats(), st.floats()),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
VALID = {
    **{name: st.sampled_from(choices) for name, choices in CHOICES.items()},
    "grid": st.sampled_from(["int", "int", "fp8", "nvfp4", "mxfp4"]),
    "group_size": st.sampled_from([-1, 32, 64, 128, 7]),
    "sym": st.booleans(),
    "ignore": st.one_of(st.none(), st.lists(st.sampled_from(["re:.*visual.*", "lm_head", "mlp\\.down"]), max_size=2)),
    "num_samples": st.integers(1, 4096),
    "max_length": st.one_of(st.none(), st.integers(2, 8192)),
    "seed": st.integers(0, 2**31),
    "gamma": st.floats(0.01, 4),
    "importance_clip": st.tuples(st.floats(0.001, 1), st.floats(1, 100)),
    "uniform_mix": st.floats(0, 1),
    "importance_topk": st.integers(1, 64),
    "token_fraction": st.floats(0.01, 1),
    "exposed": st.one_of(st.none(), st.booleans()),
    "damp": st.floats(0, 0.5),
    "act_order": st.booleans(),
    "smooth_alpha": st.floats(0, 1),
    "expert_min_tokens": st.integers(0, 10**6),
    "expert_all_tokens": st.booleans(),
}
FIELDS = {name: st.one_of(VALID[name], JUNK) for name in _SERIALIZED}


def _check_error(err: ValueError, given: dict) -> None:
    text = str(err)
    if text.startswith("TLQConfig(sym=False) cannot be saved as compressed-tensors"):  # the one cross-field rule
        assert given.get("sym") is False and given.get("save_format", "compressed-tensors") == "compressed-tensors"
        return
    if text.startswith("TLQConfig: "):  # fields valid alone that do not fit together (a grid's bits, group size...)
        assert any(f"{name}=" in text for name in SCHEME_FIELDS), text
        assert "use " in text.lower() or "set " in text.lower(), text
        return
    named = [name for name in given if text.startswith(f"TLQConfig({name}=")]
    assert named, text
    for name in named:  # the value shown is the one given, and the rule indeed refuses it
        assert not RULES[name].accepts(given[name]), text
    assert "use " in text.lower(), text


def _round_trips(cfg: TLQConfig) -> None:
    d = cfg.to_dict()
    text = json.dumps(d, allow_nan=False)  # strict JSON: no NaN/Infinity slipped through
    assert TLQConfig.from_dict(json.loads(text)).to_dict() == d


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({}, optional=FIELDS))
def test_any_arguments_give_a_valid_config_or_a_named_error(kwargs):
    try:
        cfg = TLQConfig(**kwargs)
    except ValueError as err:
        _check_error(err, kwargs)
        return
    for name, rule in RULES.items():
        assert rule.accepts(getattr(cfg, name)), name
    _round_trips(cfg)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries({}, optional=FIELDS),
    st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in _SERIALIZED), JUNK, max_size=3),
)
def test_from_dict_drops_junk_keys_and_refuses_junk_values(known, junk):
    junk.pop("tlq_version", None)
    logger = logging.getLogger("tlq_hf.config")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        cfg = TLQConfig.from_dict({"quant_method": "tlq", **known, **junk})
    except ValueError as err:
        _check_error(err, known)
        return
    finally:
        logger.removeHandler(handler)
    unknown = sorted(set(junk) - {"quant_method"})
    if unknown:
        assert any(str(unknown) in r.getMessage() for r in records)
    _round_trips(cfg)


def test_every_serialised_field_has_a_rule():
    assert set(_SERIALIZED) <= set(RULES)
