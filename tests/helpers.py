"""What the tests share: tiny models and data, recipes and CLI runs, metrics.csv and W&B file readers, and
a callback for subprocess tests. Fixtures are in ``conftest.py``; everything else shared is here."""

from __future__ import annotations

import csv
import json
import os
import signal
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import torch
import yaml
from lightning.pytorch.callbacks import Callback
from wandb.proto import wandb_internal_pb2

from distilkit.cli import main

ROOT = Path(__file__).parents[1]
TEACHER = ROOT / "recipes" / "teacher"  # the shipped, pretrained quickstart teacher
TINY_TEACHER = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2}
TINY_STUDENT = {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2}


# ------------------------------------------------------------------------------------------ models and data
def make_datamodule(corpus: Path, tokenizer_dir: Path, cache_dir: Path):
    """A set-up TextDataModule over the test corpus: blocks of 32 tokens, batches of 4."""
    from distilkit import TextDataModule

    dm = TextDataModule(
        str(corpus),
        tokenizer=str(tokenizer_dir),
        block_size=32,
        batch_size=4,
        val_fraction=0.1,
        cache_dir=str(cache_dir),
    )
    dm.setup()
    return dm


def tiny_module(datamodule, teacher=TINY_TEACHER, student=TINY_STUDENT, cls=None, **kwargs):
    """A DistillationModule (or subclass ``cls``) of tiny GPT-2s sized from the data module's tokenizer."""
    from distilkit import DistillationModule

    return (cls or DistillationModule)(
        student=student,
        teacher=teacher,
        vocab_size=datamodule.vocab_size,
        block_size=datamodule.block_size,
        eos_token_id=datamodule.eos_token_id,
        **kwargs,
    )


def tiny_trainer(tmp_path: Path, max_steps: int = 4, **kwargs):
    import lightning as L

    options = dict(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return L.Trainer(**options)


def sentencepiece_tokenizer(texts: list[str], vocab_size: int = 600, bos: bool = True):
    """A Llama-style tokenizer trained locally: BPE over ``▁``-marked words (Metaspace, prepended to a text's
    first word), byte-fallback tokens ``<0x00>``..``<0xFF>`` for any character it has no piece for, special
    ``<unk>``, ``<s>``, ``</s>``, and (``bos``) a BOS added before every text."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    vocab = dict(model["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer.model = models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def gpt2_style_tokenizer(texts: list[str], vocab_size: int = 600):
    """A byte-level BPE as GPT-2's hub tokenizer is: :func:`distilkit.data.tokenizer.train_bpe` with the
    ``ByteLevel`` post-processor that trims the leading space from token offsets."""
    from tokenizers import processors

    from distilkit.data.tokenizer import train_bpe

    tokenizer = train_bpe(texts, vocab_size=vocab_size, show_progress=False)
    tokenizer.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    return tokenizer


# ---------------------------------------------------------------------------------------- recipes and runs
def tiny_recipe(path: Path, corpus: Path, tokenizer: Path | dict, cache_dir: Path, **trainer) -> Path:
    """Write a recipe of tiny models that fits in seconds."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_steps": 4,
            "val_check_interval": 2,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "enable_model_summary": False,
            **trainer,
        },
        "model": {
            "class_path": "distilkit.DistillationModule",
            "init_args": {
                "student": TINY_STUDENT,
                "teacher": TINY_TEACHER,
                "loss": {"class_path": "distilkit.losses.ForwardKLLoss", "init_args": {"temperature": 2.0}},
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
            },
        },
        "data": {
            "class_path": "distilkit.TextDataModule",
            "init_args": {
                "train_files": str(corpus),
                "tokenizer": tokenizer if isinstance(tokenizer, dict) else str(tokenizer),
                "block_size": 32,
                "batch_size": 4,
                "val_fraction": 0.1,
                "cache_dir": str(cache_dir),
            },
        },
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str) -> None:
    main(list(args))


def fit_run(recipe: Path, run_dir: Path, *overrides: str) -> None:
    """`distilkit fit` of ``recipe`` into ``run_dir``."""
    run_cli("fit", "--config", str(recipe), "--trainer.default_root_dir", str(run_dir), *overrides)


def resume_run(recipe: Path, run_dir: Path, max_steps: int, *overrides: str) -> None:
    """Resume the run in ``run_dir`` from its last checkpoint and train on to ``max_steps``."""
    fit_run(recipe, run_dir, *overrides, "--trainer.max_steps", str(max_steps), "--ckpt_path", "last")


def flip_tensor_byte(checkpoint: Path, offset: int = 100) -> None:
    """Change one byte of the largest tensor stored in a ``torch.save`` file, keeping its size: the file still
    loads (torch does not check the zip's CRCs), with one value changed."""
    with zipfile.ZipFile(checkpoint) as archive:
        entry = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(checkpoint.read_bytes())
    start = entry.header_offset
    name_length, extra_length = struct.unpack("<HH", data[start + 26 : start + 30])  # the local file header
    data[start + 30 + name_length + extra_length + offset] ^= 0xFF
    checkpoint.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------- interrupts
def kill_when_checkpointed(process: subprocess.Popen, last: Path, at_step: int, timeout: float = 240) -> int:
    """SIGKILL ``process`` once its ``last`` checkpoint holds step ``at_step`` or later (or it has ended, or
    ``timeout`` passed); the global step of the checkpoint it left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if last.is_file() and torch.load(last, weights_only=True)["global_step"] >= at_step:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return torch.load(last, weights_only=True)["global_step"]


def signal_at_marker(
    process: subprocess.Popen, marker: Path, signum: int, timeout: float = 240
) -> tuple[int, str]:
    """Send ``signum`` once ``marker`` exists (:class:`SlowSteps` writes it) and wait: the exit status and
    the standard error."""
    deadline = time.monotonic() + timeout
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


# ------------------------------------------------------------------------------------------------ readers
def csv_rows(run_dir: Path) -> list[tuple[int, float | None, float | None]]:
    """``(step, train/loss, val/loss)`` of every row of ``metrics.csv``."""
    with open(run_dir / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    number = lambda text: float(text) if text else None  # noqa: E731
    return [(int(r["step"]), number(r.get("train/loss")), number(r.get("val/loss"))) for r in rows]


# The records of an offline W&B run's ``run-<id>.wandb`` file. wandb 0.31 no longer ships a reader. The file
# is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each with a 7-byte header (u32
# checksum, u16 length little-endian, u8 type: 1 full, 2 first, 3 middle, 4 last); a block tail shorter
# than 7 bytes is padding. Payloads are ``wandb.proto.wandb_internal_pb2.Record`` messages.
BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = path.read_bytes()
    records, pending, offset = [], b"", HEADER
    while offset + HEADER <= len(data):
        room = BLOCK - offset % BLOCK
        if room < HEADER:  # block tail padding
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        payload = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            break
        if kind == 1:
            pending = payload
        elif kind in (2, 3):
            pending = (pending if kind == 3 else b"") + payload
            continue
        elif kind == 4:
            pending += payload
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def run_file(save_dir: Path, timeout: float = 60.0) -> Path:
    """The run's ``.wandb`` file, once W&B's background service has written its exit record.

    ``run.finish()`` returns before the service has flushed everything to disk, so wait for the end.
    """
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(Path(save_dir).glob("wandb/offline-run-*/run-*.wandb"))
        try:
            if files and any(r.HasField("exit") for r in read_records(files[-1])):
                return files[-1]
        except Exception:  # a record still being written does not parse yet
            pass
        assert time.monotonic() < deadline, f"no finished offline W&B run under {save_dir}"
        time.sleep(0.2)


def _keys(items) -> set[str]:
    return {item.key or "/".join(item.nested_key) for item in items}


def history_keys(records) -> set[str]:
    """Every metric name the run logged."""
    return _keys(item for r in records if r.HasField("history") for item in r.history.item)


def config_keys(records) -> set[str]:
    """Every top-level config key the run was given."""
    return _keys(item for r in records if r.HasField("config") for item in r.config.update)


def history_rows(records) -> list[dict[str, object]]:
    """The run's history rows in order, values decoded from JSON (``_step`` included)."""
    return [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.HasField("history")
    ]


def branch_point(records) -> int | None:
    """The step a run was rewound to (``resume_from="<id>?_step=N"``), or None."""
    for r in records:
        if r.HasField("run"):
            for item in r.run.config.update:
                if item.key == "_wandb":
                    point = json.loads(item.value_json).get("branch_point")
                    return None if point is None else int(point["step"])
    return None


def rewound_history(files: list[Path]) -> list[dict[str, object]]:
    """The history W&B shows after syncing a run's offline parts in order: each part that was started with
    a rewind drops the earlier rows past its branch point (the rows the interrupted part logged again)."""
    rows: list[dict[str, object]] = []
    for path in files:
        records = read_records(path)
        point = branch_point(records)
        if point is not None:
            rows = [row for row in rows if int(row["_step"]) <= point]  # type: ignore[call-overload]
        rows += history_rows(records)
    return rows


# ------------------------------------------------------------------------------------ subprocess callbacks
class SlowSteps(Callback):
    """Sleeps after every training step (or predict batch), and touches ``marker`` once step (or batch)
    ``at_step`` is reached: a test sends its signal then."""

    def __init__(self, marker: str, at_step: int, seconds: float = 0.3) -> None:
        self.marker, self.at_step, self.seconds = Path(marker), at_step, seconds
        self.predicted = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.at_step:
            self.marker.touch()
        time.sleep(self.seconds)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.predicted += 1
        if self.predicted >= self.at_step:
            self.marker.touch()
        time.sleep(self.seconds)


class KillAtValidation(Callback):
    """SIGKILLs its own process when the validation after optimizer step ``at_step`` starts: after that step's
    checkpoint (``every_n_train_steps``), before its validation."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_validation_start(self, trainer, pl_module) -> None:
        fitting = trainer.state.fn == "fit" and not trainer.sanity_checking
        if fitting and trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGKILL)


class OutOfMemoryAt(Callback):
    """Raises the CPU allocator's out-of-memory error when training reaches step ``at_step``."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.at_step:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory")


def tiny_model_dir(path: Path, tokenizer, config: dict | None = None) -> Path:
    """A Hugging Face directory of a tiny random GPT-2 (with ``tokenizer`` saved beside it unless None)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(config or {"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2})
    model_type = fields.pop("model_type")
    size = len(tokenizer) if tokenizer is not None else 512
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=size, **fields))
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------ chat data
#: SmolLM2-135M-Instruct's chat template (ChatML with a default system turn), as its tokenizer carries it.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: Qwen2-Instruct's ChatML template (its default system turn differs from SmolLM2's).
QWEN2_TEMPLATE = SMOLLM2_TEMPLATE.replace(
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face", "You are a helpful assistant."
)
#: A plain-text template for a GPT-2 tokenizer, given by the recipe: the reply ends with EOS.
GPT2_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}<|endoftext|>{% endif %}{{ '\\n\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
#: A system turn and three user/assistant exchanges (replies with a leading space, a newline, an emoji).
THREE_TURNS = [
    {"role": "system", "content": "You answer in one line."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And three plus three?"},
    {"role": "assistant", "content": " Six, of course."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome.\nBye 👋"},
]
CHAT_TEXTS = [
    "What is two plus two? Four. And three plus three? Six, of course. Thanks! You are welcome. Bye.",
    "system user assistant You answer in one line. How are you today? Fine, thank you for asking.",
] * 20


def chat_tokenizer(kind: str, directory: Path):
    """A tokenizer of transformers class ``kind`` built from a vocabulary trained here with ``tokenizers``,
    with its model's chat special tokens and template, saved to and loaded back from ``directory``.

    ``llama``: ``LlamaTokenizer`` (SentencePiece-style BPE, byte fallback) with SmolLM2's ChatML template;
    ``qwen2``: ``Qwen2Tokenizer`` (byte-level BPE) with Qwen2's ChatML template; ``gpt2``: ``GPT2Tokenizer``
    (byte-level BPE) without a template (a recipe gives one).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, GPT2Tokenizer, LlamaTokenizer, Qwen2Tokenizer

    if kind == "llama":
        backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    else:
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        specials = ["<|endoftext|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet() if kind != "llama" else []
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + 300,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    backend.train_from_iterator(CHAT_TEXTS, trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(m) for m in model["merges"]]
    chatml = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    if kind == "llama":
        tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>")
        tokenizer.add_special_tokens(chatml)
        tokenizer.chat_template = SMOLLM2_TEMPLATE
    elif kind == "qwen2":
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges)
        tokenizer.add_special_tokens(chatml | {"eos_token": "<|im_end|>"})
        tokenizer.chat_template = QWEN2_TEMPLATE
    else:
        tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges)
    tokenizer.save_pretrained(directory)
    loaded = AutoTokenizer.from_pretrained(directory)
    assert type(loaded) is type(tokenizer), (type(loaded), type(tokenizer))
    return loaded


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


#: The domains of :func:`write_sourced_corpus`'s documents, repeating: runs of one domain, then alternating.
SOURCES = ["prose"] * 6 + ["code"] * 6 + ["prose", "code"] * 4


def write_sourced_corpus(path: Path, corpus: Path, documents: int = 70) -> Path:
    """Short documents (about 15 to 40 tokens) of the test corpus whose ``source`` names their domain
    (:data:`SOURCES`): blocks of 32 tokens hold one domain or two. For several teachers routed by source."""
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    rows = [
        {"text": texts[i % len(texts)][(i * 7) % 200 :][: 60 + (i * 13) % 90], "source": SOURCES[i % 20]}
        for i in range(documents)
    ]
    return write_jsonl(path, rows)
