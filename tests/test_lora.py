"""LoRA: prompt tags, safe file lookup, kohya and peft files applied as A1111/diffusers do, then removed exactly."""

import copy
import hashlib
import re

import pytest
import safetensors.torch
import torch
from conftest import make_tiny_components
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from ldmkit.errors import InvalidRequest, LdmError
from ldmkit.families import reference_pipeline
from ldmkit.lora import applied_loras, extract_lora_tags, lora_hashes_infotext, lora_shorthash, resolve_lora

UNET_TARGETS = re.compile(r"attentions\.\d+\.transformer_blocks\.\d+\.attn\d\.(to_q|to_k|to_v|to_out\.0)$")
TEXT_TARGETS = re.compile(r"self_attn\.(q|k|v|out)_proj$")


# --- files ---------------------------------------------------------------------------------------------------------


def kohya_lora(path, components, seed=0, rank=2, alpha=1.0, text_encoder=True):
    """A kohya/A1111 LoRA file for the tiny models; returns {module: weight-1 delta, alpha / rank * up @ down}."""
    generator = torch.Generator().manual_seed(seed)
    tensors, deltas = {}, {}
    targets = [("unet.", "lora_unet_", components.unet, UNET_TARGETS)]
    if text_encoder:
        targets.append(("text_encoder.", "lora_te_text_model_", components.text_encoder, TEXT_TARGETS))
    for owner, prefix, model, pattern in targets:
        for name, module in model.named_modules():
            if pattern.search(name):
                key = prefix + name.removeprefix("text_model.").replace(".", "_")
                down = torch.randn(rank, module.in_features, generator=generator) * 0.3
                up = torch.randn(module.out_features, rank, generator=generator) * 0.3
                tensors |= {
                    f"{key}.lora_down.weight": down,
                    f"{key}.lora_up.weight": up,
                    f"{key}.alpha": torch.tensor(alpha),
                }
                deltas[owner + name] = alpha / rank * up @ down
    safetensors.torch.save_file(tensors, path)
    return deltas


def peft_lora(folder, weight_name, seed=1):
    """A diffusers/peft LoRA file, made the way diffusers' training scripts save one."""
    parts = make_tiny_components()
    torch.manual_seed(seed)
    config = dict(r=2, lora_alpha=4, init_lora_weights=False)  # random A and B: a LoRA that changes something
    parts.unet.add_adapter(LoraConfig(target_modules=["to_q", "to_k", "to_v", "to_out.0"], **config))
    # peft's own injection: transformers' add_adapter wants a newer peft than diffusers needs
    inject_adapter_in_model(
        LoraConfig(target_modules=["q_proj", "k_proj", "v_proj", "out_proj"], **config), parts.text_encoder
    )
    StableDiffusionPipeline.save_lora_weights(
        folder,
        unet_lora_layers=get_peft_model_state_dict(parts.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(parts.text_encoder),
        weight_name=weight_name,
    )
    return folder / weight_name


# --- model outputs -------------------------------------------------------------------------------------------------


@pytest.fixture
def components():
    return make_tiny_components()


@torch.no_grad()
def outputs(components):
    """(text encoder hidden states, UNet noise prediction) for fixed inputs."""
    ids = components.tokenizer(["a red car"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = components.text_encoder(ids)[0]
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    return hidden, components.unet(sample, 10, encoder_hidden_states=hidden).sample


def state(components):
    return {
        f"{owner}.{k}": v.clone()
        for owner in ("unet", "text_encoder")
        for k, v in getattr(components, owner).state_dict().items()
    }


def assert_same_state(before, after):
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def diffusers_reference(components, loras):
    """The same LoRAs through diffusers' own StableDiffusionPipeline, on copies of the models."""
    parts = copy.deepcopy(components)
    pipe = reference_pipeline(parts)
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"ref{i}")
    pipe.set_adapters([f"ref{i}" for i in range(len(loras))], [weight for _, weight in loras])
    return outputs(parts)


# --- tags and files ------------------------------------------------------------------------------------------------


def test_lora_tags_are_taken_out_of_the_prompt():
    assert extract_lora_tags("a cat <lora:foo_v2:0.8>, <lora:bar> at night") == (
        "a cat ,  at night",
        [("foo_v2", 0.8), ("bar", 1.0)],
    )
    assert extract_lora_tags("no tags (here:1.2)") == ("no tags (here:1.2)", [])


@pytest.mark.parametrize("tag", ["<lora:foo:strong>", "<lora:foo:0.5:0.3>"])
def test_unsupported_lora_tag_arguments_are_refused(tag):
    with pytest.raises(InvalidRequest, match="lora:foo"):
        extract_lora_tags(f"a cat {tag}")


def test_resolve_lora_finds_the_file_in_subfolders(tmp_path):
    (tmp_path / "styles").mkdir()
    (tmp_path / "styles" / "ink.safetensors").write_bytes(b"x")
    assert resolve_lora("ink", tmp_path) == tmp_path / "styles" / "ink.safetensors"
    with pytest.raises(LdmError, match="'paper' not found"):
        resolve_lora("paper", tmp_path)


@pytest.mark.parametrize("name", ["../outside", "..", "styles/ink", "/etc/passwd", "..\\outside", ""])
def test_resolve_lora_never_leaves_the_lora_folder(tmp_path, name):
    (tmp_path / "loras").mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    with pytest.raises(InvalidRequest, match="without folders"):
        resolve_lora(name, tmp_path / "loras")


def test_resolve_lora_refuses_two_files_of_the_same_name(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "ink.safetensors").write_bytes(b"x")
    with pytest.raises(LdmError, match="ambiguous"):
        resolve_lora("ink", tmp_path)


# --- applying ------------------------------------------------------------------------------------------------------


def test_kohya_lora_adds_weight_times_alpha_over_rank_times_up_down(tmp_path, components):
    deltas = kohya_lora(tmp_path / "k.safetensors", components, alpha=1.0, rank=2)
    merged = copy.deepcopy(components)  # independent reference: A1111's merge of the update into the weights
    modules = {
        f"{owner}.{n}": m for owner in ("unet", "text_encoder") for n, m in getattr(merged, owner).named_modules()
    }
    with torch.no_grad():
        for name, delta in deltas.items():
            modules[name].weight += 0.7 * delta
    expected = outputs(merged)
    with applied_loras(reference_pipeline(components), [(tmp_path / "k.safetensors", 0.7)]):
        actual = outputs(components)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(actual[1], outputs(components)[1])  # the LoRA did change the prediction


def test_several_loras_match_diffusers_with_the_same_weights(tmp_path, components):
    loras = [
        (kohya_lora(tmp_path / "k.safetensors", components, seed=2, alpha=4.0) and tmp_path / "k.safetensors", 0.8),
        (peft_lora(tmp_path, "p.safetensors"), -0.5),
        (
            kohya_lora(tmp_path / "u.safetensors", components, seed=3, text_encoder=False)
            and tmp_path / "u.safetensors",
            1.2,
        ),
    ]
    expected = diffusers_reference(components, loras)
    with applied_loras(reference_pipeline(components), loras):
        actual = outputs(components)
    for got, want in zip(actual, expected, strict=True):
        assert torch.equal(got, want)


def test_peft_lora_changes_text_encoder_and_unet(tmp_path, components):
    plain = outputs(components)
    with applied_loras(reference_pipeline(components), [(peft_lora(tmp_path, "p.safetensors"), 1.0)]):
        hidden, prediction = outputs(components)
    assert not torch.allclose(hidden, plain[0]) and not torch.allclose(prediction, plain[1])


def test_removal_restores_exact_weights_and_outputs(tmp_path, components):
    before, plain = state(components), outputs(components)
    kohya_lora(tmp_path / "k.safetensors", components)
    with applied_loras(
        reference_pipeline(components), [(tmp_path / "k.safetensors", 1.0), (peft_lora(tmp_path, "p.safetensors"), 0.5)]
    ):
        pass
    assert_same_state(before, state(components))
    assert all(torch.equal(a, b) for a, b in zip(plain, outputs(components), strict=True))


def test_removal_happens_when_the_request_fails(tmp_path, components):
    before = state(components)
    kohya_lora(tmp_path / "k.safetensors", components)
    with (
        pytest.raises(RuntimeError, match="sampler broke"),
        applied_loras(reference_pipeline(components), [(tmp_path / "k.safetensors", 1.0)]),
    ):
        raise RuntimeError("sampler broke")
    assert_same_state(before, state(components))


def test_a_file_that_is_not_a_lora_is_refused_and_nothing_stays_applied(tmp_path, components):
    before = state(components)
    kohya_lora(tmp_path / "k.safetensors", components)
    safetensors.torch.save_file({"model.weight": torch.zeros(2, 2)}, tmp_path / "checkpoint.safetensors")
    loras = [(tmp_path / "k.safetensors", 1.0), (tmp_path / "checkpoint.safetensors", 1.0)]
    with (
        pytest.raises(LdmError, match="cannot apply LoRA checkpoint.safetensors"),
        applied_loras(reference_pipeline(components), loras),
    ):
        pass
    assert_same_state(before, state(components))


# --- infotext ------------------------------------------------------------------------------------------------------


def test_lora_hash_is_the_tensor_data_hash_and_ignores_metadata(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 4)}
    safetensors.torch.save_file(tensors, tmp_path / "a.safetensors", metadata={"ss_output_name": "a"})
    safetensors.torch.save_file(tensors, tmp_path / "b.safetensors", metadata={"ss_output_name": "bee", "note": "x"})
    full_a, full_b = (
        hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in ("a.safetensors", "b.safetensors")
    )
    assert full_a != full_b
    assert lora_shorthash(tmp_path / "a.safetensors") == lora_shorthash(tmp_path / "b.safetensors")
    assert re.fullmatch(r"[0-9a-f]{12}", lora_shorthash(tmp_path / "a.safetensors"))


def test_lora_hash_prefers_the_hash_kohya_stored(tmp_path):
    stored = "0123456789abcdef" * 4
    safetensors.torch.save_file({"x": torch.ones(1)}, tmp_path / "k.safetensors", metadata={"sshs_model_hash": stored})
    assert lora_shorthash(tmp_path / "k.safetensors") == "0123456789ab"


def test_lora_hashes_infotext_lists_names_as_written(tmp_path):
    stored = "fedcba9876543210" * 4
    safetensors.torch.save_file(
        {"x": torch.ones(1)}, tmp_path / "ink.safetensors", metadata={"sshs_model_hash": stored}
    )
    entries = lora_hashes_infotext([("ink", tmp_path / "ink.safetensors"), ("in:k,2", tmp_path / "ink.safetensors")])
    assert entries == {"Lora hashes": "ink: fedcba987654, ink2: fedcba987654"}
    assert lora_hashes_infotext([]) == {}
