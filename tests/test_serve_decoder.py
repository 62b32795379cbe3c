"""The server's lean decode step against the model's own forward; the batch cache it writes into."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

import lorakit
from lorakit import products
from lorakit.packed import PackedLinear, pack_for_inference
from lorakit.routing import RowRouting
from lorakit.serve import batch_cache
from lorakit.serve import decoder as decoder_module
from lorakit.serve.batch_cache import BatchCache
from lorakit.serve.decoder import Decoder, Rows
from tests.conftest import VOCAB, build, randomize_adapters

MIXES = [{"a": 1.0}, {}, {"b": 1.0}, {"a": 0.5, "b": -1.5}]


def mistral():
    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                                            max_position_embeddings=64, tie_word_embeddings=False)).eval()


def model_of(family: str):
    model = mistral() if family == "mistral" else build(family)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "lm_head", "embed_tokens"]
    for name, r in {"a": 2, "b": 4}.items():
        lorakit.inject(model, lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), adapter=name)
    randomize_adapters(model, scale=0.3)
    return model


@pytest.mark.parametrize("transposed", [False, True, "packed"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_decode_steps_equal_the_models_forward_on_a_left_padded_mixed_batch(family, transposed, monkeypatch):
    """Logits and cache of 6 steps, with either form of the Linear products or with the weights packed for
    oneDNN (`lorakit.packed`, against the unpacked model), to 1e-4 in fp32 (the bound the server promises
    for log-probabilities): rows of different lengths (so padded), each with its own adapter mix, the cache
    growing on every step (no spare columns)."""
    monkeypatch.setattr(batch_cache, "SPARE", 0)
    model = reference = model_of(family)
    if transposed == "packed":
        if not products.available():
            pytest.skip("this torch has no oneDNN")
        monkeypatch.setenv(products.ENV, "1")  # fp32 packing on any CPU
        monkeypatch.delenv("LORAKIT_PACKED_WEIGHTS", raising=False)
        model = model_of(family)
        assert pack_for_inference(model) > 0
        assert isinstance(model.model.layers[0].self_attn.q_proj.base, PackedLinear)
    decoder = Decoder.of(model)
    assert decoder is not None
    decoder.transposed = transposed is True
    g = torch.Generator().manual_seed(1)
    lengths = [5, 2, 7, 3]
    width = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(width - n, dtype=torch.long), torch.randint(1, VOCAB, (n,), generator=g)])
                       for n in lengths])  # (4, 7), left-padded
    mask = (torch.arange(width) >= width - torch.tensor(lengths)[:, None]).long()  # (4, 7)
    routing = RowRouting(MIXES)
    with torch.inference_mode(), lorakit.per_row_adapters(model, routing), \
            lorakit.per_row_adapters(reference, routing):
        out = reference(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                        cache=DynamicCache(), use_cache=True)
        ours, theirs = BatchCache.of(out.cache), out.cache
        last = out.logits[:, -1].argmax(-1, keepdim=True)  # (4, 1)
        positions = torch.tensor(lengths)[:, None]  # (4, 1)
        for _ in range(6):
            mask = torch.cat([mask, mask.new_ones(4, 1)], dim=1)
            expected = reference(input_ids=last, attention_mask=mask, position_ids=positions, cache=theirs,
                                 use_cache=True)
            got = decoder.forward(last, positions, mask, ours)[0][:, -1]  # (4, V)
            torch.testing.assert_close(got, expected.logits[:, -1], rtol=0, atol=1e-4)
            theirs = expected.cache
            assert ours.length == theirs.layers[0].keys.shape[2]
            for (K, V), layer in zip(ours.layers, theirs.layers):
                torch.testing.assert_close(K[:, :, :ours.length], layer.keys, rtol=0, atol=1e-4)
                torch.testing.assert_close(V[:, :, :ours.length], layer.values, rtol=0, atol=1e-4)
            last, positions = got.argmax(-1, keepdim=True), positions + 1


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefill_equals_the_models_forward_at_every_real_position(family, transposed):
    """Left-padded prompts with their own adapter mixes: every real position's logits and every real
    column of the cache as the model's forward gives them (padding positions stay finite)."""
    model = model_of(family)
    decoder = Decoder.of(model)
    decoder.transposed = transposed
    g = torch.Generator().manual_seed(2)
    lengths = [5, 1, 8, 3]
    width = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(width - n, dtype=torch.long), torch.randint(1, VOCAB, (n,), generator=g)])
                       for n in lengths])  # (4, 8)
    mask = (torch.arange(width) >= width - torch.tensor(lengths)[:, None]).long()  # (4, 8)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode(), lorakit.per_row_adapters(model, RowRouting(MIXES)):
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=DynamicCache(),
                         use_cache=True)
        logits, cache = decoder.forward(ids, positions, mask, None, every_position=True)  # (4, 8, V)
        last, _ = decoder.forward(ids, positions, mask, None)  # (4, 1, V)
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected.logits[real], rtol=0, atol=1e-4)
    torch.testing.assert_close(last[:, 0], expected.logits[:, -1], rtol=0, atol=1e-4)
    assert cache.length == width and torch.isfinite(logits).all()
    for (K, V), layer in zip(cache.layers, expected.cache.layers):
        assert torch.isfinite(K).all() and torch.isfinite(V).all()
        torch.testing.assert_close(K.transpose(1, 2)[real], layer.keys.transpose(1, 2)[real], rtol=0, atol=1e-4)
        torch.testing.assert_close(V.transpose(1, 2)[real], layer.values.transpose(1, 2)[real], rtol=0, atol=1e-4)


def left_padded(lengths: list[int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, mask, positions) of random prompts of `lengths` tokens, left-padded to the longest."""
    width = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(width - n, dtype=torch.long), torch.randint(1, VOCAB, (n,), generator=g)])
                       for n in lengths])
    mask = (torch.arange(width) >= width - torch.tensor(lengths)[:, None]).long()
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


@pytest.mark.parametrize("every_position", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_a_decode_step_and_new_prompts_in_one_run_equal_the_models_forward_for_each_group(transposed, every_position):
    """The engine's joined step: the running rows decode a token while new prompts prefill, one pass over
    the weights for both, each group with its own adapters (plain LoRA on every projection, the head and
    the embedding, and a DoRA adapter, whose update is not added in place): each group's logits and
    cache are the model's own forward's for that group alone, to 1e-4."""
    model = model_of("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "up_proj"], use_dora=True), adapter="d")
    randomize_adapters(model, seed=1, scale=0.3)
    decoder = Decoder.of(model)
    decoder.transposed = transposed
    g = torch.Generator().manual_seed(3)
    ids, mask, positions = left_padded([5, 2, 7, 3], g)
    running, joining = RowRouting([*MIXES[:3], {"d": 1.0, "a": 0.5}]), RowRouting([{"d": 1.0}, {"b": 2.0}, {}])
    new_ids, new_mask, new_positions = left_padded([4, 6, 1], g)
    last = torch.randint(1, VOCAB, (4, 1), generator=g)
    step_mask = torch.cat([mask, mask.new_ones(4, 1)], dim=1)
    step_positions = torch.tensor([[5], [2], [7], [3]])
    with torch.inference_mode():
        with lorakit.per_row_adapters(model, running):
            prefilled = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=DynamicCache(),
                              use_cache=True)
            stepped = model(input_ids=last, attention_mask=step_mask, position_ids=step_positions,
                            cache=prefilled.cache, use_cache=True)
        with lorakit.per_row_adapters(model, joining):
            prompted = model(input_ids=new_ids, attention_mask=new_mask, position_ids=new_positions,
                             cache=DynamicCache(), use_cache=True)
        _, cache = decoder.run([Rows(ids, positions, mask, routing=running)])[0]
        (step_logits, cache), (prompt_logits, prompt_cache) = decoder.run([
            Rows(last, step_positions, step_mask, cache, routing=running),
            Rows(new_ids, new_positions, new_mask, routing=joining, every_position=every_position)])
    torch.testing.assert_close(step_logits[:, 0], stepped.logits[:, -1], rtol=0, atol=1e-4)
    real = new_mask.bool()
    if every_position:
        torch.testing.assert_close(prompt_logits[real], prompted.logits[real], rtol=0, atol=1e-4)
    else:
        torch.testing.assert_close(prompt_logits[:, 0], prompted.logits[:, -1], rtol=0, atol=1e-4)
    for (ours, theirs, rows) in ((cache, stepped.cache, step_mask.bool()), (prompt_cache, prompted.cache, real)):
        assert ours.width == theirs.layers[0].keys.shape[2]
        for layer, want in enumerate(theirs.layers):
            K, V = ours.view(layer)
            torch.testing.assert_close(K.transpose(1, 2)[rows], want.keys.transpose(1, 2)[rows], rtol=0, atol=1e-4)
            torch.testing.assert_close(V.transpose(1, 2)[rows], want.values.transpose(1, 2)[rows], rtol=0, atol=1e-4)


def test_a_group_without_a_routing_takes_the_layers_own_adapters_and_the_other_keeps_its_own():
    """Outside the engine (no per-row routing set on the layers), a group without a routing runs the
    layers' own forward (here `set_adapters` with adapter b) while a group with one applies its own mixes."""
    model = model_of("llama")
    decoder = Decoder.of(model)
    g = torch.Generator().manual_seed(4)
    ids, mask, positions = left_padded([5, 2, 7, 3], g)
    other_ids, other_mask, other_positions = left_padded([3, 6], g)
    routing = RowRouting(MIXES)
    lorakit.set_adapters(model, {"b": 1.0})
    with torch.inference_mode():
        own = model(input_ids=other_ids, attention_mask=other_mask, position_ids=other_positions).logits[:, -1]
        with lorakit.per_row_adapters(model, routing):
            routed = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        (got_routed, _), (got_own, _) = decoder.run([Rows(ids, positions, mask, routing=routing),
                                                    Rows(other_ids, other_positions, other_mask)])
    torch.testing.assert_close(got_routed[:, 0], routed, rtol=0, atol=1e-4)
    torch.testing.assert_close(got_own[:, 0], own, rtol=0, atol=1e-4)


def test_a_prompt_joining_long_rows_gets_its_own_rope_under_a_dynamic_scaling():
    """Dynamic RoPE scaling picks its frequencies from the largest position in a call: a short prompt
    riding with rows past the model's context must still get the frequencies of its own forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                                         rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                          "rope_theta": 10000.0})).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # weights large enough that the positions show in the logits
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    decoder = Decoder.of(model)
    ids, mask, positions = left_padded([24, 20], g)  # past the 16 positions the frequencies were made for
    new_ids, new_mask, new_positions = left_padded([3, 5], g)
    with torch.inference_mode():
        expected = model(input_ids=new_ids, attention_mask=new_mask, position_ids=new_positions).logits[:, -1]
        _, cache = decoder.forward(ids, positions, mask, None)
        step = Rows(torch.tensor([[1], [2]]), torch.tensor([[24], [20]]), torch.cat([mask, mask.new_ones(2, 1)], 1),
                    cache)
        _, (got, _) = decoder.run([step, Rows(new_ids, new_positions, new_mask)])
    assert expected.abs().max() > 1
    torch.testing.assert_close(got[:, 0], expected, rtol=0, atol=1e-4)


def test_the_lean_step_is_used_only_where_its_wiring_is_the_models():
    assert Decoder.of(build("llama")) is not None and Decoder.of(build("qwen2")) is not None
    assert Decoder.of(build("gpt2")) is None  # another architecture: the model's forward runs
    hooked = build("llama")
    hooked.model.layers[0].register_forward_hook(lambda *_: None)  # a hook the lean step would skip
    assert Decoder.of(hooked) is None
    model = build("llama")
    model.model.layers[1].self_attn.q_norm = torch.nn.LayerNorm(8)  # a part the wiring does not know
    assert Decoder.of(model) is None
    embedded = model_of("llama")  # LoRA on the embedding: its wrapper's forward is bypassed too
    embedded.model.embed_tokens.register_forward_hook(lambda *_: None)
    assert Decoder.of(embedded) is None
    replaced = build("llama")
    replaced.model.layers[0].self_attn.forward = lambda *args, **kwargs: None  # as accelerate's hooks do
    assert Decoder.of(replaced) is None
    adapted = model_of("llama")  # LoRA on down_proj: lorakit's own lean MLP forward, the same maths
    assert "forward" in adapted.model.layers[0].mlp.__dict__ and Decoder.of(adapted) is not None


def test_batch_cache_equals_plain_tensor_ops_over_random_steps_joins_and_leaves(monkeypatch):
    """Against a reference kept with torch.cat / index ops: steps append a column, rows leave (the last
    rows move into their holes), prompts of other widths join (in spare room, or in new buffers), and
    columns that became padding everywhere are trimmed."""
    monkeypatch.setattr(batch_cache, "SPARE", 3)  # small, so that every kind of growth happens
    g = torch.Generator().manual_seed(0)

    def block(rows, width):
        return torch.randn(rows, 2, width, 4, generator=g)

    def pad(t, width):
        return torch.cat([t.new_zeros(t.shape[0], 2, width - t.shape[2], 4), t], 2)

    K = block(3, 5)
    cache, ref = BatchCache([(K.clone(), K.clone())], 5), K.clone()  # values = keys, enough here
    for turn in range(60):
        action = turn % 4
        if action in (0, 1):  # a decode step
            new = block(cache.rows, 1)
            cache.reserve(1)
            K1, _ = cache.write(0, new, new)
            cache.advance()
            ref = torch.cat([ref, new], 2)
            torch.testing.assert_close(K1, ref, rtol=0, atol=0)
        elif action == 2 and cache.rows > 1:  # some rows leave
            keep = sorted(torch.randperm(cache.rows, generator=g)[:max(1, cache.rows - 2)].tolist())
            order = cache.compact(keep)
            assert sorted(order) == keep
            ref = ref[order]
            cache.trim(1)  # the engine trims what is padding everywhere; here, one column
            ref = ref[:, :, 1:]
        else:  # new rows join, narrower or wider than the batch
            width = int(torch.randint(1, cache.width + 4, (1,), generator=g))
            other = block(int(torch.randint(1, 4, (1,), generator=g)), width)
            cache.join(BatchCache([(other.clone(), other.clone())], width))
            common = max(ref.shape[2], width)
            ref = torch.cat([pad(ref, common), pad(other, common)])
        K, _ = cache.view(0)
        assert cache.rows == ref.shape[0] and cache.width == ref.shape[2]
        # the new rows' padding is zeroed; the old rows' padding is only masked, so compare what rows own
        if action == 3:
            torch.testing.assert_close(K[-other.shape[0]:], pad(other, ref.shape[2]), rtol=0, atol=0)
        own = ref != 0
        torch.testing.assert_close(K[own], ref[own], rtol=0, atol=0)
    torch.testing.assert_close(cache.dynamic().layers[0].keys, cache.view(0)[0], rtol=0, atol=0)
    kept = cache.select([0, cache.rows - 1])
    torch.testing.assert_close(kept.view(0)[0], cache.view(0)[0][[0, cache.rows - 1]], rtol=0, atol=0)


@pytest.mark.parametrize("flags, dtype, expected", [
    ("avx2 fma", torch.float32, True),  # the AVX2 EPYC: x·Wᵀ 1.3-2.0x slower at a few rows
    ("avx2 fma avx512f avx512_bf16", torch.float32, False),  # Zen 5: the plain product as fast or faster
    ("avx2 fma", torch.bfloat16, False),  # bf16 goes to oneDNN
])
def test_the_product_layout_is_decided_by_the_cpu_at_the_first_forward(monkeypatch, flags, dtype, expected):
    monkeypatch.setattr(decoder_module, "cpu_info", lambda: ("AuthenticAMD", frozenset(flags.split())))
    decoder = Decoder.of(build("llama").to(dtype))
    assert decoder.transposed is None  # the first forward decides
    with torch.inference_mode():
        decoder.forward(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.long), None)
    assert decoder.transposed is expected
    assert decoder_module.transposed_faster(torch.float32, torch.device("meta")) is False  # CPUs only
