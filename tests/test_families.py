"""Every supported family end to end on a tiny random model: train, export, exported == patched, generate.

Each family's model is built from its own transformers config class with the quirks that matter switched on
(biases, q/k norms, fused projections with partial rotary, head_dim != hidden/heads, sliding windows shorter than
the generated text, attention and final logit soft-capping) and its norms/biases randomised so that they are not
identities. After a few training steps the mask projections are pushed to fixed, moderate masks (``_push_masks``).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, Qwen3MoeForCausalLM

import tomoe  # noqa: F401  (registers the tomoe model type)
from conftest import check_loads_without_tomoe, exported_decoder_ratio
from tomoe.config import ToMoEConfig
from tomoe.errors import ToMoEError
from tomoe.export import export_run
from tomoe.families import get_family, supported_model_types
from tomoe.info import model_info
from tomoe.nn.gumbel import GUMBEL_MEDIAN
from tomoe.losses import kd_loss
from tomoe.run import TrainConfig, load_run_for_inference, read_log, read_run
from tomoe.train import convert

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1)
# family key -> (transformers config class, overrides, expected adapter name)
FAMILIES = {
    "mistral": ("MistralConfig", dict(head_dim=16, sliding_window=8), "llama"),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), "qwen2"),
    "qwen3": ("Qwen3Config", dict(head_dim=16), "qwen3"),
    "phi3": ("Phi3Config", dict(partial_rotary_factor=0.5), "phi3"),
    "gemma2": ("Gemma2Config", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=8, attn_logit_softcapping=1.0, final_logit_softcapping=5.0), "gemma"),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=32, query_pre_attn_scalar=32, sliding_window=8, layer_types=["sliding_attention", "full_attention"]), "gemma"),
}
TOMOE = dict(num_experts=4, target_active=0.5)
STEPS = 4
PROMPTS = ["The lobster lives in", "def add(a, b):\n    return"]


def family_config(key: str, tokenizer=None):
    import transformers

    class_name, overrides, _ = FAMILIES[key]
    ids = dict(vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if tokenizer is not None:
        ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return getattr(transformers, class_name)(**COMMON, **overrides, **ids, tie_word_embeddings=key.startswith("gemma"))


def family_model(key: str, tokenizer=None):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(key, tokenizer), dtype=torch.float32)
    with torch.no_grad():  # norms and biases start as identities / zeros: make them matter
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return model.eval()


def _train(run_dir, model_dir, data, attention="dynamic"):
    config = TrainConfig(model=str(model_dir), data=str(data), steps=STEPS, seq_len=32, batch_size=2, lr=1e-2, save_every=STEPS, log_every=3, eval_blocks=2)
    info = convert(run_dir, ToMoEConfig(attention=attention, **TOMOE), config, progress=False)
    _push_masks(run_dir)
    return info


@torch.no_grad()
def _push_masks(run_dir):
    """Set the last layer of every mask projection so that the deterministic masks keep a fixed, moderate part.

    A few steps at lr 1e-2 on a tiny model either barely move the masks or collapse attention to nothing, which
    would leave the Q/K slicing, RoPE pairing and V/O top-K untested; afterwards the run's results are measured
    again exactly as `convert` does.
    """
    from tomoe.loading import load_model, resolve_model_source
    from tomoe.measure import summarize_routing
    from tomoe.run import load_routing, save_checkpoint, write_run

    info = read_run(run_dir)
    model = load_model(resolve_model_source(info.train.model))
    routing = load_routing(run_dir, model, info)
    # the deterministic decision keeps where logit + offset + GUMBEL_MEDIAN > 0: shift every threshold by both
    shift = info.tomoe.mask_offset + GUMBEL_MEDIAN
    ids = torch.randint(3, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    mlp_embeddings = routing._mlp_embeddings(routing.hypernet())
    for index, mlp in enumerate(routing.mlp):  # every channel kept by the 2 of the 4 experts with the largest logits
        ranked = mlp.mask_proj(mlp_embeddings[index]).sort(dim=0).values  # (experts, channels), ascending
        mlp.mask_proj[-1].bias.sub_((ranked[1] + ranked[2]) / 2 + shift)  # halfway between 2nd and 3rd: no ties at 0
    if routing.attention is not None:
        vo_logits: dict[int, torch.Tensor] = {}
        def keep(index):
            def hook(module, args, output):
                vo_logits[index] = output.flatten(0, -2)  # (tokens, head_dim)

            return hook

        handles = [a.vo_proj.register_forward_hook(keep(i)) for i, a in enumerate(routing.attention)]
        model.get_decoder()(input_ids=ids)
        for handle in handles:
            handle.remove()
        for index, attention in enumerate(routing.attention):
            attention.vo_proj[-1].bias.sub_(vo_logits[index].median(dim=0).values + shift)  # each V/O dim: half the tokens
            groups = attention.qk_proj[-1].bias.numel()
            attention.qk_proj[-1].weight.zero_()  # one RoPE pair / free dim in three is pruned
            attention.qk_proj[-1].bias.copy_(torch.tensor([-5.0 if g % 3 == 1 else 5.0 for g in range(groups)]) - shift)
    summary = summarize_routing(model, routing, ids)
    save_checkpoint(run_dir, info.train.steps, routing.state_dict(), None)
    info.result.update(summary.to_dict())
    write_run(run_dir, info)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, smol_tokenizer, tiny_text_file):
    """trained(key, attention) -> root with root/model (dense HF folder), root/run (trained run), root/moe (export);
    each combination is built once per module."""
    roots = {}

    def get(key: str, attention: str = "dynamic"):
        if (key, attention) not in roots:
            root = tmp_path_factory.mktemp(f"{key}-{attention}")
            family_model(key, smol_tokenizer).save_pretrained(root / "model")
            smol_tokenizer.save_pretrained(root / "model")
            _train(root / "run", root / "model", tiny_text_file, attention)
            export_run(root / "run", root / "moe")
            roots[key, attention] = root
        return roots[key, attention]

    return get


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_run(request, trained):
    return request.param, trained(request.param)


@pytest.fixture(scope="module")
def sample_ids():
    return torch.randint(3, 49152, (2, 20), generator=torch.Generator().manual_seed(0))


def test_family_is_detected_from_the_config_not_the_name():
    for key, (_, _, name) in FAMILIES.items():
        assert get_family(family_config(key)).name == name
    config = family_config("qwen3")
    config._name_or_path = "meta-llama/Llama-3-8B"  # a misleading name changes nothing
    assert get_family(config).name == "qwen3"
    from transformers import GPT2Config, Gemma3Config

    with pytest.raises(ToMoEError, match=r"unsupported architecture 'gpt2'.*gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3"):
        get_family(GPT2Config())
    with pytest.raises(ToMoEError, match="text-only Gemma-3"):
        get_family(Gemma3Config())
    assert {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text"} <= set(supported_model_types())


def test_qk_mask_pairs_follow_the_rotary_layout():
    family = get_family(family_config("phi3"))
    geometry = family.geometry(family_config("phi3"))
    assert (geometry.head_dim, geometry.rotary_dim) == (16, 8)
    # rotate_half over the 8 rotary dims pairs i with i + 4; the 8 position-free dims are masked one by one
    assert family.qk_mask_groups(geometry).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    gemma = get_family(family_config("gemma3")).geometry(family_config("gemma3"))
    assert (gemma.head_dim, gemma.rotary_dim) == (32, 32)  # per-layer-type RoPE parameters: full rotary


def test_fused_phi3_projections_are_split_for_the_method():
    model = family_model("phi3")
    family = get_family(model.config)
    geometry = family.geometry(model.config)
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    weights = family.attention_weights(attention, geometry)
    x = torch.randn(3, 64)
    q, k, v = attention.qkv_proj(x).split([64, 32, 32], dim=-1)
    torch.testing.assert_close(x @ weights["q"][0].T, q)
    torch.testing.assert_close(x @ weights["k"][0].T, k)
    torch.testing.assert_close(x @ weights["v"][0].T, v)
    gate, up, down = family.mlp_weights(mlp)
    torch.testing.assert_close(down @ (mlp.activation_fn(gate @ x.T) * (up @ x.T)), mlp(x).T)
    mask = torch.zeros(16)
    mask[:3] = 1
    point = family.qk_point_mask("qkv_proj", mask, 128, geometry)
    assert point[:96].tolist() == mask.repeat(6).tolist() and point[96:].eq(1).all()  # v part untouched


def test_train_export_and_exported_logits_equal_patched(family_run, sample_ids):
    key, root = family_run
    run = read_run(root / "run")
    assert run.status == "finished" and run.family == FAMILIES[key][2]
    result = run.result
    head_dim = FAMILIES[key][1].get("head_dim", 16)
    # some MLP channels and some query/key dims are pruned, V/O keeps a top-K below head_dim
    assert all(0 < w < 128 for w in result["mlp_widths"])
    assert all(2 <= d < head_dim for d in result["qk_dims"]) and all(0 < k < head_dim for k in result["vo_topk"])
    assert result["final_kd"] == read_log(root / "run")[-1]["kd"] and result["tokens"] == 64
    patched, _ = load_run_for_inference(root / "run")
    exported = AutoModelForCausalLM.from_pretrained(root / "moe")
    assert type(exported).__name__ == "TomoeForCausalLM" and exported.config.base_model_type == patched.config.model_type
    assert exported.config.qk_dims == [max(d, 2) for d in result["qk_dims"]]
    if key == "gemma2":  # sdpa cannot soft-cap attention logits: both fall back to eager
        assert exported.config._attn_implementation == patched.config._attn_implementation == "eager"
    with torch.no_grad():
        torch.testing.assert_close(exported(sample_ids).logits, patched(sample_ids).logits, atol=1e-4, rtol=0)
    # The measured ratio, and tomoe info's count over routed sample tokens (every expert of a layer has the widest
    # expert's width), are the exported model's ratio counted from its weights.
    counted = exported_decoder_ratio(exported)
    assert result["active_ratio"] == pytest.approx(counted, rel=1e-6)
    info = model_info(root / "moe")
    assert info["decoder_active_ratio"] == pytest.approx(counted, rel=1e-9) and info["num_experts"] == 4
    # The dense count is the base model's, whatever the family adds (biases, q/k norms) or fuses (Phi-3 qkv_proj).
    dense = AutoModelForCausalLM.from_pretrained(root / "model")
    assert info["dense_total_params"] == sum(p.numel() for p in dense.parameters())


def test_cached_generation_equals_uncached(family_run):
    key, root = family_run
    model = AutoModelForCausalLM.from_pretrained(root / "moe")
    patched, _ = load_run_for_inference(root / "run")
    tokenizer = AutoTokenizer.from_pretrained(root / "moe")
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)  # longer than the sliding window
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        cached = model.generate(**inputs, **kwargs)
        assert torch.equal(cached, model.generate(**inputs, use_cache=False, **kwargs))
        assert torch.equal(cached, patched.generate(**inputs, **kwargs))  # and the export generates like the run


@pytest.fixture(scope="module")
def qwen3_dense_attention(trained):
    root = trained("qwen3", "none")
    if not (root / "qwen3moe").exists():
        export_run(root / "run", root / "qwen3moe", format="qwen3_moe")
    return root


def test_qwen3_moe_export_is_stock_qwen3_moe_and_matches(qwen3_dense_attention, sample_ids):
    root = qwen3_dense_attention
    stock = Qwen3MoeForCausalLM.from_pretrained(root / "qwen3moe")
    config = stock.config
    assert config.num_experts_per_tok == 1 and config.norm_topk_prob and config.num_experts == 4
    ours = AutoModelForCausalLM.from_pretrained(root / "moe")
    patched, _ = load_run_for_inference(root / "run")
    with torch.no_grad():
        logits = ours(sample_ids).logits
        torch.testing.assert_close(stock(sample_ids).logits, logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(patched(sample_ids).logits, logits, atol=1e-4, rtol=0)
    widths = ours.config.mlp_widths
    assert min(widths) < 128 and config.moe_intermediate_size == -(-max(widths) // 8) * 8
    info = model_info(root / "qwen3moe")
    assert info["dense_total_params"] == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(root / "model").parameters())
    assert info["format"] == "qwen3_moe" and info["padding_params"] == 3 * 64 * 4 * sum(config.moe_intermediate_size - w for w in widths)
    assert json.loads((root / "qwen3moe" / "tomoe_export.json").read_text())["format"] == "qwen3_moe"


def test_stock_formats_refuse_runs_they_cannot_hold(qwen3_dense_attention, tmp_path):
    from tomoe.export.qwen3_moe import check_qwen3_moe_compatible

    run = qwen3_dense_attention / "run"
    with pytest.raises(ToMoEError, match="supports the llama family; this run is 'qwen3'"):
        export_run(run, tmp_path / "a", format="mixtral")
    with pytest.raises(ToMoEError, match="--format qwen3_moe needs a run trained with --attention none"):
        check_qwen3_moe_compatible("dynamic", "qwen3")
    with pytest.raises(ToMoEError, match="supports the qwen3 family"):
        check_qwen3_moe_compatible("none", "qwen2")
    assert not (tmp_path / "a").exists()


def test_gemma2_softcapping_in_logits_and_chunked_kd():
    model = family_model("gemma2")
    family = get_family(model.config)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    logits = family.logits(model, hidden)
    torch.testing.assert_close(logits, out.logits)  # the adapter's logits are the model's, soft-capped
    assert logits.abs().max() <= 5.0
    student = hidden + 0.1 * torch.randn_like(hidden)
    mask = torch.ones(2, 9, dtype=torch.bool)
    whole = kd_loss(student, hidden, lambda h: family.logits(model, h), mask, chunk_tokens=1000)
    chunked = kd_loss(student, hidden, lambda h: family.logits(model, h), mask, chunk_tokens=4)
    expected = torch.nn.functional.kl_div(torch.log_softmax(family.logits(model, student), -1), torch.log_softmax(logits, -1), log_target=True, reduction="sum") / 18
    torch.testing.assert_close(whole, expected)
    torch.testing.assert_close(chunked, expected)


def test_gemma3_export_loads_with_trust_remote_code_without_tomoe(trained, tmp_path, sample_ids):
    """The self-contained modeling file covers q/k norms and sliding layers without tomoe installed."""
    moe = trained("gemma3") / "moe"
    assert AutoConfig.from_pretrained(moe).base_model_type == "gemma3_text"
    assert "transformers_modules" in check_loads_without_tomoe(moe, sample_ids, tmp_path)
