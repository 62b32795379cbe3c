"""Property tests (hypothesis): any JSON value as an adapter config or an HTTP request body either loads or
is refused with a clear error (`UserError` / `ApiError` 4xx); never another exception.

Examples are drawn at random but reproducibly (derandomize), so CI sees the same ones every run.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.config import LoraConfig
from lorakit.errors import UserError
from lorakit.files import parse_json
from lorakit.serve.protocol import ApiError, parse_request

SETTINGS = settings(max_examples=400, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["", "all-linear", "q_proj", "(", "none", "all", "lora_only", "gaussian", "LORA",
                                     ".*", "layers", "\ud800"[:0] + "é"]))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)

# PEFT 0.21.2's LoraConfig fields (and ours), each given any JSON value: type confusion where it matters
LORA_FIELDS = ["r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "bias", "use_rslora",
               "init_lora_weights", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
               "modules_to_save", "fan_in_fan_out", "base_model_name_or_path", "peft_type", "task_type",
               "inference_mode", "revision", "megatron_config", "megatron_core", "trainable_token_indices",
               "loftq_config", "eva_config", "corda_config", "lora_ga_config", "use_dora", "velora_config",
               "alora_invocation_tokens", "use_qalora", "qalora_group_size", "monteclora_config", "layer_replication",
               "runtime_config", "lora_bias", "target_parameters", "use_bdlora", "arrow_config", "kasa_config",
               "ensure_weight_tying", "peft_version", "auto_mapping"]
configs = st.one_of(json_values,
                    st.fixed_dictionaries({}, optional={name: json_values for name in LORA_FIELDS}),
                    # a valid config with one field (any of PEFT's) set to any JSON value
                    st.tuples(st.sampled_from(LORA_FIELDS), json_values).map(
                        lambda kv: {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], kv[0]: kv[1]}))


@SETTINGS
@given(configs)
def test_any_json_value_is_a_config_or_a_clear_error(data):
    try:
        config = LoraConfig.from_dict(data)
    except UserError as err:
        assert str(err) and "\n" not in str(err)
        return
    # what loads is a real config: typed fields, and it round-trips through its JSON
    assert isinstance(config.r, int) and config.r > 0 and math.isfinite(config.lora_alpha)
    for names in (config.target_modules, config.exclude_modules, config.layers_pattern):
        assert names is None or isinstance(names, str) or all(isinstance(n, str) and n for n in names)
    layers = config.layers_to_transform
    assert layers is None or all(isinstance(i, int) and i >= 0 for i in ([layers] if isinstance(layers, int) else layers))
    text = json.dumps(config.to_dict(), allow_nan=False)
    again = LoraConfig.from_dict(json.loads(text))
    assert again.to_dict() == config.to_dict()
    assert config.scaling_for("model.layers.0.self_attn.q_proj") > 0


@SETTINGS
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode) |
       json_values.map(lambda v: json.dumps(v).encode()))
def test_any_bytes_as_adapter_config_json_parse_or_fail_clearly(raw):
    try:
        LoraConfig.from_dict(parse_json(raw, "adapter_config.json"))
    except UserError as err:
        assert "\n" not in str(err)


# the HTTP request schema: OpenAI's fields (and lorakit's) with any JSON values
REQUEST_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                  "top_k", "seed", "stop", "stream", "stream_options", "adapters", "n", "best_of", "logprobs",
                  "top_logprobs", "echo", "suffix", "frequency_penalty", "presence_penalty", "logit_bias", "tools",
                  "user", "min_p", "repetition_penalty", "ignore_eos", "min_tokens", "response_format"]
requests = st.one_of(
    st.dictionaries(st.text(max_size=8), json_values, max_size=4),
    st.fixed_dictionaries({}, optional={name: json_values for name in REQUEST_FIELDS}),
    # a valid request with one field set to any JSON value
    st.tuples(st.sampled_from(REQUEST_FIELDS), json_values).map(
        lambda kv: {"model": "m", "prompt": "hi", "messages": [{"role": "user", "content": "hi"}], kv[0]: kv[1]}),
)


@SETTINGS
@given(requests, st.booleans())
def test_any_request_body_is_parsed_or_a_4xx(body, chat):
    try:
        params = parse_request(body, chat)
    except ApiError as err:
        assert 400 <= err.status < 500 and err.message
        shape = err.body()["error"]
        assert set(shape) == {"message", "type", "param", "code"}
        return
    assert isinstance(params.model, str) and params.model
    assert 0 <= params.temperature <= 2 and 0 < params.top_p <= 1 and params.top_k >= 0
    assert params.max_tokens is None or (isinstance(params.max_tokens, int) and params.max_tokens >= 1)


def test_the_property_tests_see_what_they_claim():
    """The strategies do reach configs that load and requests that parse (else the properties are empty)."""
    from hypothesis import find

    find(configs, lambda d: isinstance(d, dict) and len(d) > 3 and _loads(d), settings=SETTINGS)
    find(requests, lambda b: _parses(b), settings=SETTINGS)


def _loads(data) -> bool:
    try:
        LoraConfig.from_dict(data)
        return True
    except UserError:
        return False


def _parses(body) -> bool:
    try:
        parse_request(body, chat=False)
        return True
    except ApiError:
        return False
