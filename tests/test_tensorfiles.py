"""Safetensors files read and written one tensor at a time, against safetensors' and transformers' own readers."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build, logits
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lorakit.errors import UserError
from lorakit.tensorfiles import INDEX_NAME, Planned, read_header, stored_tensors, write_shards

TENSORS = {
    "a": torch.randn(3, 5),
    "b": torch.randn(7).to(torch.bfloat16),
    "c": torch.arange(6, dtype=torch.int64).view(2, 3),
    "d": torch.tensor([True, False, True]),
    "e": torch.randn(4, 4).to(torch.float16),
    "f": torch.empty(0, 3),
    "g": torch.arange(5, dtype=torch.uint8),
}


def _plan(tensors):
    return [Planned(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]


def test_reads_what_safetensors_wrote(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors")
    stored = stored_tensors(tmp_path)
    assert stored.keys() == TENSORS.keys()
    for key, tensor in TENSORS.items():
        value = stored[key].read()
        assert value.dtype == tensor.dtype and torch.equal(value, tensor), key


@pytest.mark.parametrize("max_bytes", [1 << 30, 64, 1])
def test_safetensors_reads_what_we_wrote_in_one_or_many_shards(tmp_path, max_bytes):
    files = write_shards(tmp_path, _plan(TENSORS), max_shard_bytes=max_bytes)
    assert (len(files) == 1) == (max_bytes == 1 << 30) and (tmp_path / INDEX_NAME).is_file() == (len(files) > 1)
    read = {}
    for file in files:
        read.update(load_file(file))
    assert read.keys() == TENSORS.keys() and all(torch.equal(read[k], v) for k, v in TENSORS.items())
    assert {k: s.read() for k, s in stored_tensors(tmp_path).items()}.keys() == TENSORS.keys()
    if len(files) > 1:
        index = json.loads((tmp_path / INDEX_NAME).read_text())
        assert set(index["weight_map"]) == set(TENSORS)
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in TENSORS.values())


def test_transformers_loads_a_sharded_model_we_wrote(tmp_path, ids):
    model = build("llama")
    model.config.save_pretrained(tmp_path)
    state = model.state_dict()
    write_shards(tmp_path, _plan(state), max_shard_bytes=30_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_a_tensor_that_differs_from_its_plan_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="planned"):
        write_shards(tmp_path, [Planned("a", torch.float32, (2, 2), lambda: torch.zeros(2, 3))])


def _corrupt(tmp_path, header: bytes, body: bytes = b"") -> None:
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + body)


@pytest.mark.parametrize("header,body", [
    (b"not json", b""),
    (b"[1, 2]", b""),
    (json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode(), b"1234"),  # truncated
    (json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(), b"12345678"),  # shape
    (json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}).encode(), b"12345678"),
    (json.dumps({"a": {"shape": [2], "data_offsets": [0, 8]}}).encode(), b"12345678"),
])
def test_broken_files_are_one_clear_error(tmp_path, header, body):
    _corrupt(tmp_path, header, body)
    with pytest.raises(UserError, match="not a valid safetensors file"):
        stored_tensors(tmp_path)


def test_unknown_dtypes_bad_lengths_missing_shards_and_no_weights_are_clear_errors(tmp_path):
    _corrupt(tmp_path, json.dumps({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode(), b"1" * 8)
    with pytest.raises(UserError, match="dtype C64"):
        stored_tensors(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((10 ** 12).to_bytes(8, "little"))
    with pytest.raises(UserError, match="not a valid safetensors file"):
        read_header(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no .safetensors weights"):
        stored_tensors(tmp_path)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError, match="names model-00002-of-00002.safetensors, which is not in"):
        stored_tensors(tmp_path)
    (tmp_path / INDEX_NAME).write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    with pytest.raises(UserError, match="not in"):
        stored_tensors(tmp_path)
    (tmp_path / INDEX_NAME).write_text("{")
    with pytest.raises(UserError, match="not a valid safetensors index"):
        stored_tensors(tmp_path)


def test_a_file_truncated_after_its_header_was_read_is_a_clear_error(tmp_path):
    save_file({"a": torch.randn(100)}, tmp_path / "model.safetensors")
    stored = stored_tensors(tmp_path)["a"]
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(UserError, match="truncated"):
        stored.read()
