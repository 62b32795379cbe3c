"""The preference objectives against TRL (the oracle) and their own invariants.

TRL's trainers are built around a PEFT copy of the same adapter on the same tiny base and fed the
same token ids through TRL's own collators; `trainer.compute_loss` then runs TRL's whole definition
(log-probs from its fused head, the reference from PEFT's disabled adapter, KTO's KL term from the
mismatched pairs). Loss and every adapter gradient must match lorakit's to 1e-5, in fp32.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit import distributed
from lorakit.losses import IGNORE, causal_lm_loss, token_logps
from lorakit.objectives import DPO, KTO, REFERENCE_ADAPTER, Preference, add_reference, reference, sequence_logps
from lorakit.preferences import Judged, Pair, joined
from lorakit.data import Example

from conftest import randomize_adapters

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PROMPTS = ["The ship sailed at", "In the beginning was", "A computer program reads", "The captain saw the red",
           "Hackers say", "We sail"]
GOOD = [" dawn.", " the word.", " input and writes output.", " sky.", " foo and bar.", " north."]
BAD = [" foo foo!", " the crew crew!", " bar!", " ship ship!", " light!", " and and and!"]
SEQ = 64


def _tokens(tokenizer, text: str, specials: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=specials).input_ids


def _completion(tokenizer, text: str) -> Example:
    ids = _tokens(tokenizer, text, False) + [tokenizer.eos_token_id]
    return Example(ids, list(ids))


TARGETS = ["q_proj", "v_proj", "down_proj"]


def _models(tiny_base, tmp_path, start: str):
    """lorakit's model and what TRL is given, fp32, with the same starting adapter A0.

    start="new": TRL gets the plain base and a peft_config (its reference: adapters disabled, the base);
    start="init_from": TRL gets a PeftModel holding A0 (its reference: a frozen "ref" copy of A0).
    """
    ours = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    lorakit.inject(ours, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    randomize_adapters(ours, seed=3, scale=0.3)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    if start == "new":
        return ours, base, {"peft_config": peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)}, None
    lorakit.save_adapter(ours, tmp_path / "a0")
    ours = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    add_reference(ours, tmp_path / "a0")
    lorakit.load_adapter(ours, tmp_path / "a0", adapter="default", trainable=True)
    assert lorakit.active_adapters(ours) == {"default": 1.0}
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "a0", is_trainable=True)
    return ours, theirs, {}, REFERENCE_ADAPTER


def _move_policy(ours, theirs, seed: int = 4, scale: float = 0.3):
    """Set the trainable adapter of both to the same A1 (away from the reference, whatever it is)."""
    g = torch.Generator().manual_seed(seed)
    peers = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
                peers[f"base_model.model.{name}.weight"].copy_(p)
    ours.train()
    theirs.train()


def _grads(model, strip: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = name.removeprefix(strip).removesuffix(".weight")
            out[key] = p.grad.detach().clone()
    return out


def _compare(ours_loss, trl_loss, ours, theirs):
    assert torch.allclose(ours_loss, trl_loss, rtol=0, atol=1e-5), (ours_loss.item(), trl_loss.item())
    mine = _grads(ours)
    peers = {k: v for k, v in _grads(theirs, strip="base_model.model.").items() if k in mine}
    assert set(mine) == set(peers)
    for key in mine:
        assert peers[key].abs().max() > 0, key  # the batch reaches every adapter
        torch.testing.assert_close(mine[key], peers[key], rtol=0, atol=1e-5, msg=key)


def _trl_args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False, fp16=False,
               per_device_train_batch_size=len(PROMPTS), logging_steps=1, save_strategy="no", **kw)


@pytest.mark.parametrize("start", ["new", "init_from"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_and_gradients_equal_trl(tiny_base, tmp_path, beta, start):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    ours, theirs, kwargs, reference_adapter = _models(tiny_base, tmp_path, start)
    pairs = [Pair(_tokens(tokenizer, p, True), _completion(tokenizer, g), _completion(tokenizer, b))
             for p, g, b in zip(PROMPTS, GOOD, BAD)]

    records = [{"prompt": p, "chosen": g, "rejected": b} for p, g, b in zip(PROMPTS, GOOD, BAD)]
    trainer = trl.DPOTrainer(model=theirs, args=_trl_args(trl.DPOConfig, tmp_path, beta=beta),
                             train_dataset=datasets.Dataset.from_list(records), processing_class=tokenizer, **kwargs)
    _move_policy(ours, trainer.model)
    inputs = trainer.data_collator([{"prompt_ids": p.prompt, "chosen_ids": p.chosen.input_ids,
                                     "rejected_ids": p.rejected.input_ids} for p in pairs])
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    batch = DPO.collate(pairs, 0, len(pairs), tokenizer.pad_token_id, SEQ)
    assert torch.equal(batch["input_ids"], inputs["input_ids"])  # the same rows, chosen first
    objective = DPO(ours, Preference(beta=beta), reference_adapter)
    loss = objective(batch, 1.0)
    loss.backward()
    _compare(loss, trl_loss, ours, trainer.model)
    figures = objective.figures(distributed.World())
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert figures[key] == pytest.approx(trainer._metrics["train"][key][-1], abs=1e-5), key


# (policy seed, scale): the first gives this batch a positive KL estimate, the second a negative one (clamped to 0)
@pytest.mark.parametrize("start", ["new", "init_from"])
@pytest.mark.parametrize("weights, policy", [((1.0, 1.0), (7, 0.1)), ((1.0, 1.33), (4, 0.3))])
def test_kto_loss_and_gradients_equal_trl(tiny_base, tmp_path, weights, policy, start):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    ours, theirs, kwargs, reference_adapter = _models(tiny_base, tmp_path, start)
    labels = [True, False, True, True, False, False]
    texts = [g if good else b for g, b, good in zip(GOOD, BAD, labels)]
    records = [Judged(_tokens(tokenizer, p, True), _completion(tokenizer, t), good)
               for p, t, good in zip(PROMPTS, texts, labels)]

    data = datasets.Dataset.from_list([{"prompt": p, "completion": t, "label": good}
                                       for p, t, good in zip(PROMPTS, texts, labels)])
    args = _trl_args(trl.KTOConfig, tmp_path, beta=0.1, desirable_weight=weights[0], undesirable_weight=weights[1],
                     train_sampling_strategy="sequential")
    trainer = trl.KTOTrainer(model=theirs, args=args, train_dataset=data, processing_class=tokenizer, **kwargs)
    _move_policy(ours, trainer.model, *policy)
    previous = records[-1:] + records[:-1]  # TRL's KL completions: each record's predecessor in the batch
    inputs = trainer.data_collator([{"prompt_ids": r.prompt, "completion_ids": r.completion.input_ids,
                                     "KL_completion_ids": p.completion.input_ids, "label": r.good}
                                    for r, p in zip(records, previous)])
    trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_loss.backward()

    batch = KTO.collate(records, 0, len(records), tokenizer.pad_token_id, SEQ)
    assert torch.equal(batch["input_ids"], inputs["input_ids"])
    assert torch.equal(batch["kl_input_ids"], inputs["KL_input_ids"])
    objective = KTO(ours, Preference(beta=0.1, desirable_weight=weights[0], undesirable_weight=weights[1]),
                    distributed.World(), reference_adapter)
    loss = objective(batch, 1.0)
    loss.backward()
    _compare(loss, trl_loss, ours, trainer.model)
    figures = objective.figures(distributed.World())
    assert (figures["kl"] > 0) == (policy == (7, 0.1)) or start == "init_from"
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert figures[key] == pytest.approx(trainer._metrics["train"][key][-1], abs=1e-5), key


# ---- invariants ---------------------------------------------------------------------------------


def test_token_logps_equal_log_softmax_of_the_logits_and_their_gradients(tiny_base):
    """The chunked per-token log-probs (no full logits) against the plain formula, values and gradients."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE
    labels[2, 9:] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    weights = torch.randn(3, 11, generator=g)

    got = token_logps(model, batch, chunk_elements=7 * model.config.vocab_size)  # several chunks
    (got * weights).sum().backward()
    got_grads = _grads(model)
    model.zero_grad()
    logits = model(input_ids=ids).logits[:, :-1]
    want = torch.log_softmax(logits, -1).gather(2, labels[:, 1:].clamp(min=0)[..., None]).squeeze(2)
    want = want.masked_fill(labels[:, 1:] == IGNORE, 0)
    (want * weights).sum().backward()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for key, grad in _grads(model).items():
        torch.testing.assert_close(got_grads[key], grad, rtol=0, atol=1e-5)


def test_reference_is_the_base_and_leaves_the_adapter_on(tiny_base):
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=1)
    ids = torch.tensor([[1, 5, 9, 13, 17, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with reference(model):
        ref = sequence_logps(model, batch)
    assert not ref.requires_grad
    assert torch.equal(ref, sequence_logps(base, batch))
    assert not torch.equal(sequence_logps(model, batch), ref)
    assert lorakit.active_adapters(model) == {"default": 1.0}


def test_joined_rows_learn_the_completion_only_and_respect_seq_len():
    row = joined([1, 5, 6], Example([7, 8, 2], [7, 8, 2]), seq_len=5)
    assert row.input_ids == [1, 5, 6, 7, 8]
    assert row.labels == [IGNORE, IGNORE, IGNORE, 7, 8]


def test_sft_loss_is_unchanged(tiny_base):
    """`sft` is the plain causal-LM loss; the objectives module adds nothing to it."""
    from lorakit.objectives import SFT

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13, 17, 2]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    assert torch.equal(SFT(model)(batch, 0.5), causal_lm_loss(model, batch) * 0.5)
