"""Several teachers: routed by a row field or the data file (per token, through packing), mixed in log
space, only the needed ones run, rows naming no teacher refused or trained on their labels, knobs, and
validation by domain."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import (
    TINY_STUDENT,
    TINY_TEACHER,
    fit_run,
    run_cli,
    tiny_module,
    tiny_recipe,
    tiny_trainer,
    write_jsonl,
    write_sourced_corpus,
)
from torch.utils.data import default_collate
from transformers import AutoModelForCausalLM, GPT2Config

from distilkit import CurriculumCallback, TextDataModule
from distilkit.batch import next_token_targets
from distilkit.data.teacher_cache import SparseTargets
from distilkit.errors import ConfigError
from distilkit.losses import ForwardKLLoss
from distilkit.losses.partial import PartialTargets
from distilkit.run.loggers import CSVLogger
from distilkit.teachers import CachedTeacher, LiveTeacher, SeveralTeachers
from distilkit.teachers.teachings import MixedChunks, cat_sparse, merge_rows


@pytest.fixture(scope="module")
def sourced(tmp_path_factory, corpus: Path) -> Path:
    """70 short documents whose ``source`` names their domain: blocks of 32 tokens hold one domain or two."""
    return write_sourced_corpus(tmp_path_factory.mktemp("sourced") / "docs.jsonl", corpus)


def _data(files, tokenizer_dir: Path, cache_dir: Path, **kwargs) -> TextDataModule:
    data = TextDataModule(
        files, tokenizer=str(tokenizer_dir), block_size=32, batch_size=4, cache_dir=str(cache_dir), **kwargs
    )
    data.setup()
    return data


def _model(vocab: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_layer=1, n_embd=32, n_head=2, n_positions=32)
    return AutoModelForCausalLM.from_config(config).eval()


class Spy(LiveTeacher):
    """A live teacher that records how many rows each batch it teaches has."""

    def __init__(self, model: torch.nn.Module, vocab: int) -> None:
        super().__init__(model, vocab)
        self.rows: list[int] = []

    def teach(self, batch, split, hidden=False):
        self.rows.append(batch["input_ids"].shape[0])
        return super().teach(batch, split, hidden)


def _several(data: TextDataModule, names=("prose", "code"), **kwargs) -> SeveralTeachers:
    """Spy teachers of ``names``, checked against ``data`` as a trainer's setup does."""
    vocab = data.vocab_size
    teachers = {name: Spy(_model(vocab, seed), vocab) for seed, name in enumerate(names)}
    source = SeveralTeachers(teachers, **({"route_by": "source"} | kwargs))
    trainer = SimpleNamespace(datamodule=data)
    source.check_run(trainer, SimpleNamespace(loss=ForwardKLLoss(), vocab_size=vocab), "fit")
    return source


def _batch(data: TextDataModule, indices: list[int]) -> dict[str, torch.Tensor]:
    return default_collate([data.datasets["train"][i] for i in indices])


def _blocks_by_kind(data: TextDataModule) -> tuple[list[int], list[int]]:
    """Training blocks of one domain and blocks of two."""
    domains = data.datasets["train"].domains
    assert domains is not None
    kinds = [len(set(row[row >= 0].tolist())) for row in domains]
    return [i for i, k in enumerate(kinds) if k == 1], [i for i, k in enumerate(kinds) if k == 2]


def _gather(chunks, total: int, size: int) -> torch.Tensor:
    return torch.cat([chunks(slice(a, min(a + size, total))) for a in range(0, total, size)])


# ------------------------------------------------------------------------------------------------- routing
def test_every_position_is_taught_by_the_teacher_its_next_tokens_document_names(
    sourced, tokenizer_dir, cache_dir
):
    data = _data(str(sourced), tokenizer_dir, cache_dir, domains="source")
    source = _several(data)
    one, two = _blocks_by_kind(data)
    batch = _batch(data, [two[0], one[0], two[1], one[-1]])
    keep, _ = next_token_targets(batch["labels"])
    domain = batch["domain"][:, 1:][keep]  # (N,): the document of the token each position predicts
    with torch.no_grad():
        full = {
            name: source.teacher(i).model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            for i, name in enumerate(source.names)
        }
    ids = {name: data.domain_names.index(name) for name in source.names}
    expected = torch.where(
        (domain == ids["prose"]).unsqueeze(-1), full["prose"][:, :-1][keep], full["code"][:, :-1][keep]
    )  # (N, V)
    chunks = source.teach(batch, "train").at(keep)
    for size in (len(domain), 7, 1):  # whole, chunks that straddle domains, single rows
        torch.testing.assert_close(_gather(chunks, len(domain), size), expected, rtol=1e-5, atol=1e-5)
    # each teacher ran once, on only the rows that hold its positions
    rows = {
        name: {i for i in range(4) if (batch["domain"][i, 1:] == ids[name]).any()} for name in source.names
    }
    assert [teacher.rows for teacher in source.all_teachers()] == [[len(rows["prose"])], [len(rows["code"])]]
    assert 0 < len(rows["prose"]) < 4 and 0 < len(rows["code"]) < 4


def test_a_batch_of_one_domain_runs_that_teacher_only(sourced, tokenizer_dir, cache_dir):
    data = _data(str(sourced), tokenizer_dir, cache_dir, domains="source")
    source = _several(data)
    one, _ = _blocks_by_kind(data)
    code = data.domain_names.index("code")
    pure = [i for i in one if int(data.datasets["train"].domains[i].max()) == code][:2]
    batch = _batch(data, pure)
    keep, _ = next_token_targets(batch["labels"])
    chunks = source.teach(batch, "train").at(keep)
    assert torch.is_tensor(chunks(slice(0, int(keep.sum()))))
    prose, code_teacher = source.all_teachers()
    assert prose.rows == [] and code_teacher.rows == [2]


def test_routing_by_data_file(tmp_path, sourced, tokenizer_dir, cache_dir):
    """``route_by: file``: a document's teacher is named by the file it came from."""
    rows = [json.loads(line) for line in sourced.read_text().splitlines()]
    for name in ("prose", "code"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": r["text"]} for r in rows if r["source"] == name])
    files = [str(tmp_path / "prose.jsonl"), str(tmp_path / "code.jsonl")]
    data = _data(files, tokenizer_dir, cache_dir, domains="file")
    assert data.domain_names == ["prose", "code"]
    source = _several(data, route_by="file")
    _, two = _blocks_by_kind(data)  # the block where the prose file ends and the code file begins
    batch = _batch(data, two[:1])
    keep, _ = next_token_targets(batch["labels"])
    with torch.no_grad():
        code = source.teacher(1).model(batch["input_ids"]).logits[:, :-1][keep]
    chunks = source.teach(batch, "train").at(keep)
    on_code = batch["domain"][:, 1:][keep] == 1
    torch.testing.assert_close(_gather(chunks, len(on_code), 5)[on_code], code[on_code], rtol=1e-5, atol=1e-5)


def test_rows_naming_no_teacher_are_refused_naming_the_row(tmp_path, sourced, tokenizer_dir, cache_dir):
    rows = [json.loads(line) for line in sourced.read_text().splitlines()]
    rows[9]["source"] = "poetry"
    del rows[12]["source"]
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    data = _data(str(path), tokenizer_dir, cache_dir, domains="source")
    with pytest.raises(ConfigError, match=rf"{path}:10: source='poetry': names no teacher of model.teachers"):
        _several(data)
    rows[9]["source"] = "prose"
    data = _data(str(write_jsonl(path, rows)), tokenizer_dir, cache_dir, domains="source")
    with pytest.raises(ConfigError, match=rf"{path}:13: source=None: is missing.*unrouted: labels"):
        _several(data)


def test_with_unrouted_labels_such_rows_learn_from_their_labels_alone(
    tmp_path, sourced, tokenizer_dir, cache_dir, lightning_log
):
    rows = [json.loads(line) for line in sourced.read_text().splitlines()]
    for i in range(12, 20):
        rows[i]["source"] = "poetry"
    path = write_jsonl(tmp_path / "docs.jsonl", rows)
    data = _data(str(path), tokenizer_dir, cache_dir, domains="source")
    source = _several(data, unrouted="labels")
    alone = data.document_domains.tokens(data.datasets["train"])["poetry"]  # type: ignore[union-attr]
    said = lightning_log.text
    assert f"model.unrouted=labels: {alone:,} of " in said and "['poetry']" in said
    poetry = data.domain_names.index("poetry")
    domains = data.datasets["train"].domains
    mixed = [i for i, row in enumerate(domains) if (row == poetry).any() and (row != poetry).any()]
    batch = _batch(data, mixed[:2])
    keep, _ = next_token_targets(batch["labels"])
    teaching = source.teach(batch, "train")
    untaught = batch["domain"][:, 1:][keep] == poetry
    share = teaching.logged["labels_only_share"]
    torch.testing.assert_close(share, untaught.float().mean())
    chunk = teaching.at(keep)(slice(0, len(untaught)))
    assert isinstance(chunk, PartialTargets) and torch.equal(chunk.taught, ~untaught)
    assert chunk.count == int((~untaught).sum()) and chunk.targets.shape[0] == chunk.count  # type: ignore[union-attr]
    # in a run: trains, and logs the share of each step's positions that learned from their labels alone
    two = {"prose": TINY_TEACHER, "code": TINY_TEACHER}
    module = tiny_module(data, teacher=None, teachers=two, route_by="source", unrouted="labels")
    logger = CSVLogger(save_dir=str(tmp_path / "run"), name="", version="")
    tiny_trainer(tmp_path, max_steps=3, logger=logger, log_every_n_steps=1).fit(module, data)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    shares = [float(r["train/labels_only_share"]) for r in rows if r.get("train/labels_only_share")]
    assert len(shares) == 3 and all(0 <= share < 1 for share in shares) and max(shares) > 0


def test_teachers_the_data_never_names_stay_off_the_device(sourced, tokenizer_dir, cache_dir):
    data = _data(str(sourced), tokenizer_dir, cache_dir, domains="source")
    source = _several(data, names=("prose", "code", "unused"))
    assert list(source.members) == ["0", "1"], "the unused teacher is not registered: it does not move"
    assert len(source.all_teachers()) == 3 and "unused" in source.identity()["teachers"]
    assert not any(key.startswith("members.2.") for key in source.state_dict())
    assert any(key.startswith("members.1.") for key in source.state_dict())


# -------------------------------------------------------------------------------------------------- mixing
def test_the_mixture_is_the_weighted_mean_of_the_distributions():
    torch.manual_seed(0)
    a, b = torch.randn(5, 7), torch.randn(5, 7) * 3
    chunks = MixedChunks((lambda rows, out=None: a[rows], lambda rows, out=None: b[rows]), (1.0, 3.0))
    by_hand = torch.log(0.25 * F.softmax(a, -1) + 0.75 * F.softmax(b, -1))
    torch.testing.assert_close(chunks(slice(0, 5)), by_hand, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunks(slice(1, 3)), by_hand[1:3], rtol=1e-6, atol=1e-6)
    alone = MixedChunks((lambda rows, out=None: a[rows],), (2.0,))
    assert torch.equal(alone(slice(0, 5)), a), "one teacher: its logits as they are"


def test_the_posterior_mixture_weighs_each_teacher_by_its_probability_of_the_next_token():
    """``m = Σ_j π_j softmax(z_j)``, ``π_j = w_j p_j(y) / Σ_k w_k p_k(y)``, against float64 by hand."""
    torch.manual_seed(0)
    a, b = torch.randn(6, 7), torch.randn(6, 7) * 3
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    chunks = MixedChunks((lambda rows, out=None: a[rows], lambda rows, out=None: b[rows]), (1.0, 3.0), labels)
    p, q = F.softmax(a.double(), -1), F.softmax(b.double(), -1)
    pa, qb = 0.25 * p[range(6), labels][:, None], 0.75 * q[range(6), labels][:, None]
    by_hand = torch.log((pa * p + qb * q) / (pa + qb)).float()
    torch.testing.assert_close(chunks(slice(0, 6)), by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunks(slice(2, 5)), by_hand[2:5], rtol=1e-5, atol=1e-5)
    doubt = a.clone()
    doubt[[0, 1], [0, 1]] = -40.0  # the first teacher all but rules out the labels: the second teaches
    chunks = MixedChunks(
        (lambda rows, out=None: doubt[rows], lambda rows, out=None: b[rows]), (1.0, 1.0), labels
    )
    torch.testing.assert_close(chunks(slice(0, 2)).exp(), b[:2].softmax(-1), rtol=0, atol=1e-6)
    flat, never = torch.zeros(1, 7), a[:1].clone()
    flat[0, 0] = never[0, 0] = -math.inf  # a label both teachers rule out: the prior, never NaN
    chunks = MixedChunks((lambda rows, out=None: flat, lambda rows, out=None: never), (1.0, 9.0), labels)
    first = chunks(slice(0, 1))
    assert not first.isnan().any()
    torch.testing.assert_close(first.exp(), flat.softmax(-1) / 10 + 9 * never.softmax(-1) / 10)


def test_posterior_mixing_of_live_teachers(sourced, tokenizer_dir, cache_dir):
    data = _data(str(sourced), tokenizer_dir, cache_dir, domains="source")
    source = _several(data, route_by=None, mix={"prose": 1.0, "code": 2.0}, mix_by="posterior")
    batch = _batch(data, [0, 1])
    keep, labels = next_token_targets(batch["labels"])
    chunks = source.teach(batch, "train").at(keep)
    with torch.no_grad():
        p = [
            t.model(batch["input_ids"]).logits[:, :-1][keep].double().softmax(-1)
            for t in source.all_teachers()
        ]
    joint = [w * probs[range(len(labels)), labels][:, None] for w, probs in zip((1, 2), p, strict=True)]
    by_hand = torch.log((joint[0] * p[0] + joint[1] * p[1]) / (joint[0] + joint[1])).float()
    torch.testing.assert_close(_gather(chunks, len(by_hand), 6), by_hand, rtol=1e-5, atol=1e-5)
    assert source.identity()["mix_by"] == "posterior"
    fair = torch.log((p[0] + 2 * p[1]) / 3).float()  # validation: the prior mixture, which reads no label
    torch.testing.assert_close(
        _gather(source.teach(batch, "val").at(keep), len(fair), 6), fair, rtol=1e-5, atol=1e-5
    )


def test_mixed_teachers_teach_every_position_and_weight_zero_is_not_run(sourced, tokenizer_dir, cache_dir):
    data = _data(str(sourced), tokenizer_dir, cache_dir, domains="source")
    source = _several(data, route_by=None, mix={"prose": 1.0, "code": 0.0})
    assert list(source.members) == ["0"], "weight 0 when the run starts: kept off the device"
    batch = _batch(data, [0, 1])
    keep, _ = next_token_targets(batch["labels"])
    source.teach(batch, "train")
    assert source.knobs == ("mix.prose", "mix.code") and source.set_knob("mix.code", 2.0)
    chunks = source.teach(batch, "val").at(keep)
    prose, code = source.all_teachers()
    assert (prose.rows, code.rows) == ([2, 2], [2]), "a teacher raised from 0 runs from then on"
    with torch.no_grad():
        z = [t.model(batch["input_ids"]).logits[:, :-1][keep] for t in (prose, code)]
    by_hand = torch.log(F.softmax(z[0], -1) / 3 + 2 * F.softmax(z[1], -1) / 3)
    torch.testing.assert_close(_gather(chunks, len(by_hand), 6), by_hand, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="model.mix.prose=-1"):
        source.set_knob("mix.prose", -1)


def test_mix_weights_are_knobs_a_curriculum_stage_changes(tmp_path, sourced, tokenizer_dir, cache_dir):
    data = _data(str(sourced), tokenizer_dir, cache_dir)
    vocab = data.vocab_size
    spies = {"prose": Spy(_model(vocab, 0), vocab), "code": Spy(_model(vocab, 1), vocab)}
    module = tiny_module(data, teacher=None, teachers=spies, mix={"prose": 0.5, "code": 0.5})
    assert {"mix.prose", "mix.code", "kd_ratio", "temperature"} <= module.knob_names()
    with pytest.raises(ConfigError, match="stage knob mix.poetry"):
        module.apply_knobs({"mix.poetry": 1.0})
    stages = [{"name": "both", "steps": 2}, {"name": "prose", "steps": 2, "knobs": {"mix.code": 0.0}}]
    curriculum = CurriculumCallback(stages=stages, monitor="val/loss")
    trainer = tiny_trainer(tmp_path, max_steps=4, callbacks=[curriculum], limit_val_batches=0)
    trainer.fit(module, data)
    assert len(spies["prose"].rows) == 4 and len(spies["code"].rows) == 2, "stage 2 runs prose only"
    assert module.teacher_source.weights == [0.5, 0.0]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("knobs", "problem"),
    [({"mix.prose": 0.0, "mix.code": 0.0}, "are all 0"), ({"mix.code": -1.0}, "is not a weight")],
)
def test_a_stage_of_bad_mix_weights_is_refused_before_the_first_step(
    tmp_path, sourced, tokenizer_dir, cache_dir, knobs, problem
):
    data = _data(str(sourced), tokenizer_dir, cache_dir)
    vocab = data.vocab_size
    spies = {"prose": Spy(_model(vocab, 0), vocab), "code": Spy(_model(vocab, 1), vocab)}
    module = tiny_module(data, teacher=None, teachers=spies, mix={"prose": 0.5, "code": 0.5})
    stages = [{"name": "both", "steps": 2}, {"name": "none", "steps": 2, "knobs": knobs}]
    trainer = tiny_trainer(tmp_path, max_steps=4, callbacks=[CurriculumCallback(stages=stages)])
    with pytest.raises(ConfigError, match=rf"^stages\[1\] \(none\)\.knobs=.*{problem}"):
        trainer.fit(module, data)
    assert module.global_step == 0 and spies["code"].rows == [], "refused before any training step"


def test_a_routed_run_refuses_mix_knobs_saying_they_need_mixing(tmp_path, sourced, tokenizer_dir, cache_dir):
    data = _data(str(sourced), tokenizer_dir, cache_dir, domains="source")
    vocab = data.vocab_size
    spies = {"prose": Spy(_model(vocab, 0), vocab), "code": Spy(_model(vocab, 1), vocab)}
    module = tiny_module(data, teacher=None, teachers=spies, route_by="source")
    stages = [{"name": "both", "steps": 2}, {"name": "prose", "steps": 2, "knobs": {"mix.code": 0.0}}]
    trainer = tiny_trainer(tmp_path, max_steps=4, callbacks=[CurriculumCallback(stages=stages)])
    with pytest.raises(ConfigError) as refused:
        trainer.fit(module, data)
    assert str(refused.value).startswith("stages[1].knobs=['mix.code']: are not knobs of DistillationModule")
    assert "exist only when the teachers are mixed (model.mix, not model.route_by)" in str(refused.value)
    assert module.global_step == 0 and spies["code"].rows == []
    with pytest.raises(ConfigError, match=r"stage knob mix.code.*only when the teachers are mixed"):
        module.apply_knobs({"mix.code": 1.0})


# ------------------------------------------------------------------------------------------------- caches
def test_routed_sparse_targets_are_merged_in_row_order():
    def targets(ids: list[int]) -> SparseTargets:
        rows = torch.tensor(ids).unsqueeze(-1).repeat(1, 3)  # (n, 3)
        return SparseTargets("topk", rows, -rows.float(), tail=torch.zeros(len(ids)))

    merged = merge_rows(
        [
            (torch.tensor([0, 3]).numpy(), targets([10, 13])),
            (torch.tensor([1, 2]).numpy(), targets([11, 12])),
        ],
        None,
    )
    assert isinstance(merged, SparseTargets) and merged.ids[:, 0].tolist() == [10, 11, 12, 13]
    assert merged.tail is not None and merged.tail.shape == (4,)
    narrow = SparseTargets(
        "topk", torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2), tail=torch.zeros(2)
    )
    with pytest.raises(ConfigError, match="caches keep different numbers of entries"):
        merge_rows(
            [(torch.tensor([0, 1]).numpy(), targets([1, 2])), (torch.tensor([2, 3]).numpy(), narrow)], None
        )


# ------------------------------------------------------------------------------------- the module and logs
def test_validation_logs_each_domains_perplexity(sourced, tokenizer_dir, cache_dir, tmp_path):
    """``val/<domain>/ppl`` and ``teacher_ppl`` against a hand computation over the same batches."""
    data = _data(str(sourced), tokenizer_dir, cache_dir)
    module = tiny_module(
        data, teacher=None, teachers={"prose": TINY_TEACHER, "code": TINY_TEACHER}, route_by="source"
    )
    trainer = tiny_trainer(tmp_path, limit_val_batches=3)
    trainer.validate(module, data, verbose=False)
    assert data.domain_field == "source", "the data took what the model routes by"
    logged = trainer.callback_metrics
    source = module.teacher_source
    assert isinstance(source, SeveralTeachers)
    module.eval()  # the student as validation ran it (no dropout)
    sums = {(who, name): [0.0, 0] for who in ("student", "teacher") for name in ("prose", "code")}
    for index, batch in enumerate(data.val_dataloader()):
        if index == 3:
            break
        keep, labels = next_token_targets(batch["labels"])
        domains = batch["domain"][:, 1:][keep]
        with torch.no_grad():
            student = module(batch["input_ids"], batch["attention_mask"])[:, :-1][keep]
            teachers = [
                t.model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                for t in source.all_teachers()
            ]
        for t, name in enumerate(source.names):
            own = domains == data.domain_names.index(name)
            for who, logits in (("student", student), ("teacher", teachers[t][:, :-1][keep])):
                nll = F.cross_entropy(logits[own], labels[own], reduction="sum")
                sums[who, name][0] += float(nll)
                sums[who, name][1] += int(own.sum())
    for (who, name), (nll, count) in sums.items():
        metric = f"val/{name}/{'ppl' if who == 'student' else 'teacher_ppl'}"
        assert count > 0 and math.isclose(float(logged[metric]), math.exp(nll / count), rel_tol=1e-4), metric
    assert "val/ppl" in logged and "val/kd_loss" in logged


def test_settings_that_do_not_fit_together_are_one_line_errors(tmp_path, sourced, tokenizer_dir, cache_dir):
    data = _data(str(sourced), tokenizer_dir, cache_dir)
    two = {"prose": TINY_TEACHER, "code": TINY_TEACHER}
    cases = [
        ({"teacher": TINY_TEACHER, "teachers": two}, "model.teachers=.*given together with model.teacher"),
        (
            {"teacher": None, "teachers": two, "route_by": "source", "mix": {"code": 1}},
            "model.route_by=.*model.mix",
        ),
        ({"teacher": None, "teachers": two, "mix": {"poetry": 1}}, "model.mix.poetry=1: names no teacher"),
        ({"teacher": None, "teachers": two, "mix": {"cod": 1}}, r"names no teacher of .*; use 'code'\.$"),
        (
            {"teacher": None, "teachers": two, "mix": {"code": 1}},
            r"gives no weight to \['prose'\] .*prose: 0",
        ),
        ({"teacher": None, "teachers": two, "mix": {"code": 0}}, "model.mix=.*gives no teacher a positive"),
        ({"teacher": TINY_TEACHER, "route_by": "source"}, "model.route_by='source': is for model.teachers"),
        ({"teacher": TINY_TEACHER, "mix_by": "posterior"}, "model.mix_by='posterior': is for model.teachers"),
        (
            {"teacher": None, "teachers": two, "route_by": "source", "mix_by": "posterior"},
            "model.mix_by='posterior': is for mixing",
        ),
        (
            {"teacher": None, "teachers": two, "mix": {"code": 1}, "mix_by": "label"},
            "model.mix_by='label': is not weights or posterior",
        ),
        ({"teacher": None, "teachers": {"a.b": TINY_TEACHER}}, "model.teachers='a.b': is not a teacher name"),
        ({"teacher": None, "teachers": {}}, "model.teachers=.*is not a mapping"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            tiny_module(data, **kwargs)
    module = tiny_module(data, teacher=None, teachers=two, route_by="source")
    data.domains = "file"  # the data carries another field than the teachers are routed by
    with pytest.raises(ConfigError, match="data.domains='file': is not what model.route_by names"):
        tiny_trainer(tmp_path, max_steps=1).fit(module, data)


TWO = json.dumps({"prose": TINY_TEACHER, "code": TINY_TEACHER})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--model.init_args.teachers", "{prose: null}"], "model.teachers.prose=None: is not a teacher"),
        (["--model.init_args.teachers", "{}"], "model.teachers={}: is not a mapping of names to teachers"),
        (
            ["--model.init_args.teachers", TWO, "--model.init_args.mix", "{prose: -1}"],
            "model.mix.prose=-1.0: is not a weight",
        ),
        (
            ["--model.init_args.teachers", TWO, "--model.init_args.mix", "{prose: 1}"]
            + ["--model.init_args.unrouted", "labels"],
            "model.unrouted='labels': is for routing",
        ),
        (
            ["--model.init_args.teachers", json.dumps({"prose": TINY_TEACHER, "poetry": TINY_TEACHER})],
            "docs.jsonl:7: source='code': names no teacher of model.teachers ['prose', 'poetry']",
        ),
        (
            ["--model.init_args.teachers", TWO, "--model.init_args.mix_by", "posterior"],
            "model.mix_by='posterior': is for mixing",
        ),
        (["--model.init_args.teachers", TWO, "--data.init_args.domains", ""], "data.domains='': is empty"),
        (
            ["--model.init_args.teachers", TWO, "--data.init_args.domains", "file"],
            "data.domains='file': is not what model.route_by names (source)",
        ),
    ],
)
def test_bad_settings_from_the_command_line_exit_2_with_one_line(
    overrides, message, tmp_path, sourced, tokenizer_dir, cache_dir, capsys
):
    recipe = tiny_recipe(tmp_path / "r.yaml", sourced, tokenizer_dir, cache_dir, max_steps=1)
    routed = ["--model.init_args.teacher", "null", "--model.init_args.route_by", "source"]
    if "--model.init_args.mix" in overrides:
        routed = routed[:2]
    with pytest.raises(SystemExit) as exit_info:
        fit_run(recipe, tmp_path / "run", *routed, *overrides)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert len([line for line in err.splitlines() if "model." in line or "data." in line]) == 1


def test_a_routed_recipe_runs_from_yaml(tmp_path, sourced, tokenizer_dir, cache_dir):
    recipe = tiny_recipe(
        tmp_path / "r.yaml", sourced, tokenizer_dir, cache_dir, max_steps=2, val_check_interval=2
    )
    config = yaml.safe_load(recipe.read_text())
    init = config["model"]["init_args"]
    init["teacher"] = None
    init["teachers"] = {"prose": TINY_TEACHER, "code": TINY_TEACHER}
    init["route_by"] = "source"
    recipe.write_text(yaml.safe_dump(config))
    fit_run(recipe, tmp_path / "run")
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/prose/ppl", "val/code/ppl", "val/prose/teacher_ppl", "val/code/teacher_ppl"} <= set(header)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["init_args"]
    assert (
        saved["teachers"] == {"prose": TINY_TEACHER, "code": TINY_TEACHER} and saved["route_by"] == "source"
    )
    assert saved["student"] == TINY_STUDENT


def test_a_posterior_mixture_recipe_runs_from_yaml(tmp_path, sourced, tokenizer_dir, cache_dir):
    recipe = tiny_recipe(
        tmp_path / "r.yaml", sourced, tokenizer_dir, cache_dir, max_steps=2, val_check_interval=2
    )
    config = yaml.safe_load(recipe.read_text())
    config["model"]["init_args"] |= {
        "teacher": None, "teachers": {"prose": TINY_TEACHER, "code": TINY_TEACHER},
        "mix": {"prose": 1, "code": 3}, "mix_by": "posterior",
    }  # fmt: skip
    recipe.write_text(yaml.safe_dump(config))
    fit_run(recipe, tmp_path / "run")
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    kd = [float(row["train/kd_loss"]) for row in rows if row.get("train/kd_loss")]
    assert kd and all(math.isfinite(value) for value in kd)
    assert [row["val/docs/ppl"] for row in rows if row.get("val/docs/ppl")], "one domain (the file) logged"
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["init_args"]
    assert saved["mix_by"] == "posterior" and saved["mix"] == {"prose": 1, "code": 3}


@pytest.mark.slow
def test_the_shipped_recipe_distils_both_teachers(tmp_path, cache_dir):
    """``recipes/multi_teacher.yaml`` cut to 3 steps: each domain's perplexity, and its own teacher's (9
    validation batches of 16 blocks reach past the 115 blocks of prose into the code)."""
    root = Path(__file__).parents[2]
    run_cli(
        "fit", "--config", str(root / "recipes" / "multi_teacher.yaml"), "--trainer.default_root_dir",
        str(tmp_path / "run"), "--trainer.max_steps", "3", "--trainer.val_check_interval", "3",
        "--trainer.limit_val_batches", "9", "--data.init_args.cache_dir", str(cache_dir),
    )  # fmt: skip
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    for domain in ("python-reference", "python-code"):
        assert {f"val/{domain}/ppl", f"val/{domain}/teacher_ppl"} <= set(header)


@pytest.mark.slow
def test_teacher_caches_are_routed_too(tmp_path, sourced, tokenizer_dir, cache_dir):
    """Two ``distilkit cache`` directories (two different teachers over the same blocks) as routed teachers:
    each position gets its own teacher's cached targets, and a routed fit trains from them. (Domains leave
    the data's identity alone, so caches made without them fit.)"""
    recipe = tiny_recipe(
        tmp_path / "r.yaml", sourced, tokenizer_dir, cache_dir, max_steps=2, val_check_interval=2
    )
    caches = {}
    for seed, name in enumerate(("prose", "code")):
        caches[name] = tmp_path / f"cache-{name}"
        run_cli(
            "cache", "--config", str(recipe), "--output_dir", str(caches[name]), "--top_k", "8",
            "--seed_everything", str(seed), "--trainer.enable_progress_bar", "false",
        )  # fmt: skip
    data = _data(str(sourced), tokenizer_dir, cache_dir, domains="source", val_fraction=0.1)
    members = {name: CachedTeacher(path) for name, path in caches.items()}
    source = SeveralTeachers(dict(members), route_by="source")
    module = SimpleNamespace(loss=ForwardKLLoss(temperature=2.0), vocab_size=data.vocab_size)
    source.check_run(SimpleNamespace(datamodule=data), module, "fit")
    _, two = _blocks_by_kind(data)
    batch = _batch(data, two[:3])
    keep, _ = next_token_targets(batch["labels"])
    on_code = batch["domain"][:, 1:][keep] == data.domain_names.index("code")
    chunks = source.teach(batch, "train").at(keep)
    parts = [chunks(slice(a, min(a + 5, len(on_code)))) for a in range(0, len(on_code), 5)]
    merged = cat_sparse(parts)  # the rows of every chunk, in order
    own = {
        name: member.teach(batch, "train").at(keep)(slice(0, len(on_code)))
        for name, member in members.items()
    }
    for field in ("ids", "log_probs"):
        want = torch.where(on_code.unsqueeze(-1), getattr(own["code"], field), getattr(own["prose"], field))
        assert torch.equal(getattr(merged, field), want), field
    config = yaml.safe_load(recipe.read_text())
    config["model"]["init_args"] |= {
        "teacher": None, "route_by": "source",
        "teachers": {name: {"cache": str(path)} for name, path in caches.items()},
    }  # fmt: skip
    recipe.write_text(yaml.safe_dump(config))
    fit_run(recipe, tmp_path / "run")
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/prose/ppl", "val/code/ppl", "train/kd_loss"} <= set(header)
