"""lorakit.mlp: gated MLP blocks that recompute act(gate) * up in the backward.

Oracle: the block's own op-by-op forward under autograd. The lean path must give bit-identical
losses and gradients, keep less for the backward, and step aside wherever it cannot apply.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn
from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaMLP

import lorakit
from conftest import VOCAB, build, randomize_adapters
from lorakit import mlp
from lorakit.losses import causal_lm_loss
from lorakit.train import enable_activation_checkpointing

SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _gemma():  # GELU-tanh gated MLP: exercises the generic (autograd) act backward
    return GemmaForCausalLM(GemmaConfig(**SHAPE, head_dim=8))


BUILDERS = {"llama": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE)),
            "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE)),
            "gemma": _gemma}


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _model(family: str, config: lorakit.LoraConfig, adapters: int = 1) -> nn.Module:
    torch.manual_seed(0)
    family, _, nf4 = family.partition("+")
    model = BUILDERS[family]()
    if nf4:  # QLoRA: every base Linear but the head stored in NF4
        lorakit.quantize(model, "nf4")
    for i in range(adapters):
        lorakit.inject(model, copy.deepcopy(config), adapter=f"a{i}")
    randomize_adapters(model)
    if adapters > 1:
        lorakit.set_adapters(model, {f"a{i}": 0.5 + i for i in range(adapters)})
        for _, layer in lorakit.lora_layers(model):
            for table in (layer.lora_A, layer.lora_B):
                for p in table.values():
                    p.requires_grad_(True)  # train them all: every gradient path of the Function runs
    return model.train()


def _lean_blocks(model: nn.Module) -> int:
    return sum(getattr(m.__dict__.get("forward"), "func", None) is mlp.lean_forward for m in model.modules())


def _plain(model: nn.Module) -> nn.Module:
    """The same model with every block back on its own forward: the oracle."""
    other = copy.deepcopy(model)
    for module in other.modules():
        mlp.uninstall(module)
    assert _lean_blocks(other) == 0
    return other


def _loss_and_grads(model: nn.Module, autocast: bool = False):
    torch.manual_seed(1)  # the same dropout masks for the lean block and its oracle
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = causal_lm_loss(model, _batch())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


ALL = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
DROP = lorakit.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules="all-linear")
CASES = {  # id -> (family, config, adapters, autocast)
    "llama-fp32": ("llama", ALL, 1, False),
    "llama-bf16-autocast": ("llama", ALL, 1, True),
    "qwen2-bias-free-mlp": ("qwen2", ALL, 1, False),
    "gemma-gelu-tanh": ("gemma", ALL, 1, False),
    "llama-two-adapters-weighted": ("llama", ALL, 2, False),
    "llama-down-and-gate-only": ("llama", lorakit.LoraConfig(r=3, target_modules=["down_proj", "gate_proj"]), 1, False),
    "llama-qlora-nf4-base": ("llama+nf4", ALL, 1, False),
    "llama-qlora-nf4-bf16-autocast": ("llama+nf4", ALL, 1, True),
    "llama-dropout": ("llama", DROP, 1, False),
    "llama-dropout-bf16-autocast": ("llama", DROP, 1, True),
    "qwen2-dropout-two-adapters": ("qwen2", DROP, 2, False),  # gradients close, not equal: see below
    "llama-rslora": ("llama", lorakit.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["down_proj"]),
                     1, False),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_lean_block_gives_the_same_loss_and_gradients_bit_for_bit(case):
    family, config, adapters, autocast = CASES[case]
    model = _model(family, config, adapters)
    assert _lean_blocks(model) == 2  # one per decoder layer
    oracle = _plain(model)
    loss, grads = _loss_and_grads(model, autocast)
    want_loss, want = _loss_and_grads(oracle, autocast)
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want.keys() and grads
    # With dropout on two adapters, three gradients meet at the product, and autograd adds them in
    # another order than the Function does: the last bits may differ. Everything else is exact.
    exact = config.lora_dropout == 0 or adapters == 1
    for name in grads:
        if exact:
            assert torch.equal(grads[name], want[name]), name
        else:
            torch.testing.assert_close(grads[name], want[name], rtol=1e-5, atol=1e-7)


def _saved_bytes(model: nn.Module) -> int:
    """Bytes of the tensors autograd keeps for the backward of one loss (each storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        causal_lm_loss(model, _batch())
    return sum(storages.values())


@pytest.mark.parametrize("config", [ALL, DROP], ids=["no-dropout", "dropout"])
def test_lean_block_keeps_two_intermediate_tensors_fewer_per_layer(config):
    model = _model("llama", config)
    tokens, inter, layers = 3 * 12, SHAPE["intermediate_size"], SHAPE["num_hidden_layers"]
    torch.manual_seed(0)
    plain = _saved_bytes(_plain(model))
    torch.manual_seed(0)
    # act's output and the product (fp32); with dropout both paths keep down_proj's one-byte mask
    assert plain - _saved_bytes(model) == 2 * 4 * tokens * inter * layers


def test_blocks_step_aside_where_the_lean_path_does_not_apply(monkeypatch):
    calls = []
    apply = mlp.GatedDown.apply
    monkeypatch.setattr(mlp.GatedDown, "apply", lambda *args: calls.append(1) or apply(*args))

    def lean_calls(model) -> int:
        calls.clear()
        torch.manual_seed(0)
        loss = causal_lm_loss(model, _batch())
        if loss.requires_grad:
            loss.backward()
        return len(calls)

    model = _model("llama", ALL)
    assert lean_calls(model) == 2
    with torch.no_grad():  # inference: the block's own forward, the same logits
        assert lean_calls(model) == 0
        assert torch.equal(model(_batch()["input_ids"]).logits, _plain(model)(_batch()["input_ids"]).logits)
    with lorakit.disable_adapters(model):
        assert lean_calls(model) == 0
    with lorakit.per_row_adapters(model, ["a0", None, "a0"]):
        assert lean_calls(model) == 0
    lorakit.merge(model)
    assert lean_calls(model) == 0  # merged: no gradient flows through the block at all
    lorakit.unmerge(model)


def test_installed_only_where_down_proj_has_lora_and_removed_by_unload():
    model = _model("llama", lorakit.LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    assert _lean_blocks(model) == 0  # no LoRA on down_proj: nothing of ours to run
    model = _model("llama", ALL)
    assert _lean_blocks(model) == 2
    twin = copy.deepcopy(model)  # the installed forward follows the copy, not the original
    block = twin.model.layers[0].mlp
    assert block.forward.args == (block,)
    thawed = pickle.loads(pickle.dumps(model))  # and the model still pickles (e.g. torch.save(model))
    assert _lean_blocks(thawed) == 2 and thawed.model.layers[1].mlp.forward.args[0] is thawed.model.layers[1].mlp
    lorakit.unload(model)
    assert _lean_blocks(model) == 0 and all(not isinstance(m, lorakit.LoraLayer) for m in model.modules())
    for family in ("gpt2", "mlp"):  # no gated MLP: nothing installed
        other = build(family)
        lorakit.inject(other, lorakit.LoraConfig(r=2, target_modules=["c_fc", "c_proj"] if family == "gpt2" else ["down"]))
        assert _lean_blocks(other) == 0


class AddsABias(LlamaMLP):
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x)) + 1.0


class Documented(LlamaMLP):
    def forward(self, hidden):
        """Same expression, another argument name."""
        # and a comment
        return self.down_proj(self.act_fn(self.gate_proj(hidden)) * self.up_proj(hidden))


class UpFirst(LlamaMLP):  # the same value, but the projections run in another order: not ours to reorder
    def forward(self, x):
        return self.down_proj(self.up_proj(x) * self.act_fn(self.gate_proj(x)))


class Spelled(LlamaMLP):
    def forward(self, x):
        down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        return down_proj


@pytest.mark.parametrize("cls, expected", [(LlamaMLP, True), (Spelled, True), (Documented, True),
                                           (AddsABias, False), (UpFirst, False), (nn.Linear, False)])
def test_only_blocks_whose_forward_is_exactly_the_gated_expression_qualify(cls, expected):
    assert mlp.is_gated_mlp(cls) is expected


def test_a_forward_replaced_on_the_instance_is_left_alone():
    torch.manual_seed(0)
    model = BUILDERS["llama"]()
    block = model.model.layers[0].mlp
    hooked = block.forward  # what accelerate's hooks do: an instance attribute
    block.forward = hooked
    lorakit.inject(model, ALL)
    assert block.__dict__["forward"] is hooked and _lean_blocks(model) == 1


def test_activation_checkpointing_with_lean_blocks_gives_the_same_gradients():
    model = _model("llama", ALL)
    oracle = _plain(model)
    enable_activation_checkpointing(model)
    loss, grads = _loss_and_grads(model)
    want_loss, want = _loss_and_grads(oracle)
    assert torch.equal(loss, want_loss)
    for name in grads:
        assert torch.equal(grads[name], want[name]), name


def test_block_whose_down_proj_runs_no_adapter_still_passes_gradients_through():
    model = _model("llama", ALL)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="attention")
    randomize_adapters(model)
    lorakit.set_adapters(model, "attention")  # down_proj holds a0, inactive: the Function runs with none
    model.train()
    oracle = _plain(model)
    loss, grads = _loss_and_grads(model)
    want_loss, want = _loss_and_grads(oracle)
    assert torch.equal(loss, want_loss) and grads.keys() == want.keys()
    assert any("q_proj" in name for name in grads)
    for name in grads:
        assert torch.equal(grads[name], want[name]), name


def test_block_whose_down_proj_lost_its_last_adapter_runs_its_own_forward():
    model = _model("llama", ALL)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="attention")
    lorakit.delete_adapter(model, "a0")  # down_proj is a plain Linear again; the block keeps lean_forward
    assert isinstance(model.model.layers[0].mlp.down_proj, nn.Linear)
    model.train()
    loss, grads = _loss_and_grads(model)
    want_loss, want = _loss_and_grads(_plain(model))
    assert torch.equal(loss, want_loss) and all(torch.equal(grads[n], want[n]) for n in grads)


def test_bf16_base_with_fp32_adapters_without_autocast_gives_the_same_gradients():
    """The adapters read a cast copy of the product (as `lorakit train --dtype bf16` runs without autocast)."""
    model = _model("llama", DROP).to(torch.bfloat16)
    for _, layer in lorakit.lora_layers(model):
        for table in (layer.lora_A, layer.lora_B):
            for param in table.values():
                param.data = param.data.float()  # fp32 masters, as inject makes them on a bf16 base
    assert _lean_blocks(model) == 2
    oracle = _plain(model)
    loss, grads = _loss_and_grads(model)
    want_loss, want = _loss_and_grads(oracle)
    assert torch.equal(loss, want_loss)
    for name in grads:
        assert grads[name].dtype == torch.float32 and torch.equal(grads[name], want[name]), name
