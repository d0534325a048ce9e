"""The offline teacher cache: compact encoding, shards and manifest, resume, several writers, refusals."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from distilkit.data.teacher_cache import CacheWriter, TeacherCache, finalize_cache
from distilkit.data.teacher_cache.codec import (
    bytes_per_position,
    encode,
    id_dtype,
    sample_targets,
    topk_targets,
)
from distilkit.errors import ConfigError
from distilkit.losses import ForwardKLLoss

V, T = 256, 16
IDENTITY = {"teacher": "tiny", "teacher_config_hash": "c0", "tokenizer_hash": "t0", "data_fingerprint": "d0"}
NUM_BLOCKS = {"train": 16, "val": 3}


def teacher_logits(blocks: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    """``(blocks, T, V)`` logits of a stand-in teacher: Gaussian, sharpness 0.5 … 8 per position."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.empty(blocks, T, 1).uniform_(0.5, 8.0, generator=g)
    return torch.randn(blocks, T, vocab, generator=g) * scale


LOGITS = {"train": teacher_logits(16, seed=1), "val": teacher_logits(3, seed=2)}


def writer(directory: Path, mode: str = "topk", entries: int = 8, **kwargs) -> CacheWriter:
    settings = {"temperature": 1.0, "vocab_size": V, "block_size": T, "num_blocks": NUM_BLOCKS}
    settings.update(identity=IDENTITY, shard_blocks=4)
    return CacheWriter(directory, mode, entries, **{**settings, **kwargs})


def write_blocks(w: CacheWriter, split: str, blocks: list[int], batch: int = 3) -> None:
    for start in range(0, len(blocks), batch):
        chunk = blocks[start : start + batch]
        w.write(split, torch.tensor(chunk), LOGITS[split][chunk])


def full_cache(directory: Path, mode: str = "topk", entries: int = 8, **kwargs) -> TeacherCache:
    w = writer(directory, mode, entries, **kwargs)
    for split, count in NUM_BLOCKS.items():
        write_blocks(w, split, list(range(count)))
    w.finalize()
    return TeacherCache(directory)


def all_targets(cache: TeacherCache) -> dict[str, list[torch.Tensor]]:
    out = {}
    for split, count in NUM_BLOCKS.items():
        t = cache.targets(split, list(range(count)))
        out[split] = [x for x in (t.ids, t.log_probs, t.tail, t.weights) if x is not None]
    return out


def assert_same_targets(a: TeacherCache, b: TeacherCache) -> None:
    for (split, left), right in zip(all_targets(a).items(), all_targets(b).values(), strict=True):
        for x, y in zip(left, right, strict=True):
            assert torch.equal(x, y), split


# ------------------------------------------------------------------------------------------------ encoding
@pytest.mark.parametrize("k", [1, 8, 64, V])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_round_trip_is_within_the_stated_bound(k: int, temperature: float) -> None:
    logits = teacher_logits(4, seed=3).reshape(-1, V)  # (N, V)
    ids, log_probs, tail = topk_targets(logits, k, temperature)
    encoded = encode(ids, log_probs, tail, V)
    assert encoded.ids.dtype == np.uint16 and encoded.codes.dtype == np.uint8
    assert encoded.offset.dtype == encoded.step.dtype == encoded.tail.dtype == np.float16
    decoded = torch.from_numpy(encoded.log_probs())
    step = torch.from_numpy(encoded.step).double()
    error = (decoded.double() - log_probs.double()).abs()  # (N, K)
    assert (error <= step.unsqueeze(-1) / 2 + 1e-5).all()  # the stated bound, float32 rounding aside
    # the step follows the largest gap between consecutive kept entries: error <= gap / 508 (+ float16)
    gaps = torch.cat([log_probs[:, :1] * 0, log_probs[:, :-1] - log_probs[:, 1:]], -1).amax(-1).double()
    assert (step <= torch.clamp(gaps / 254, min=2**-14) * (1 + 2**-10) + 1e-12).all()
    assert np.array_equal(encoded.ids, ids.numpy())
    decoded_tail = torch.from_numpy(encoded.tail).double()
    if k == V:
        assert torch.isneginf(decoded_tail).all()
    else:
        assert ((decoded_tail - tail.double()).abs() <= tail.double().abs() * 2**-11 + 1e-7).all()
    # exact top-k: the tail is the mass of every other id
    p = (logits.double() / temperature).softmax(-1)
    kept_mass = p.gather(-1, ids).sum(-1)
    torch.testing.assert_close(kept_mass + tail.double().exp(), torch.ones_like(kept_mass), rtol=0, atol=1e-5)


def test_real_distributions_decode_within_two_hundredths_of_a_nat() -> None:
    """Where no two consecutive kept entries are more than 10.16 nats apart, the error is below 0.02."""
    logits = teacher_logits(8, seed=4).reshape(-1, V)
    ids, log_probs, tail = topk_targets(logits, 64, 1.0)
    gaps = (log_probs[:, :-1] - log_probs[:, 1:]).amax(-1)
    encoded = encode(ids, log_probs, tail, V)
    decoded = torch.from_numpy(encoded.log_probs())
    error = (decoded - log_probs).abs().amax(-1)  # (N,)
    assert (gaps <= 10.16).any() and (error[gaps <= 10.16] <= 0.02).all()


def test_a_large_gap_coarsens_the_step_but_not_the_top_entry() -> None:
    """A 20-nat gap after the top entry: step ~ 20/254, error <= 0.04 below it, the top exact to float16."""
    log_probs = torch.tensor([[-1e-6, -20.0, -20.5, -21.25, -23.0]])
    encoded = encode(torch.arange(5).unsqueeze(0), log_probs, torch.tensor([-25.0]), 64)
    decoded = torch.from_numpy(encoded.log_probs())
    assert float(encoded.step[0]) == pytest.approx(20 / 254, rel=1e-3)
    assert (decoded - log_probs).abs().max() <= float(encoded.step[0]) / 2 + 1e-6
    assert abs(float(decoded[0, 0]) - float(log_probs[0, 0])) < 1e-7


def test_sampled_round_trip_and_order() -> None:
    logits = teacher_logits(2, seed=5).reshape(-1, V)
    ids, log_probs = sample_targets(logits, torch.rand(logits.shape[0], 12), 1.0)
    assert (log_probs[:, :-1] >= log_probs[:, 1:]).all()  # sorted for the encoding
    torch.testing.assert_close(log_probs, logits.log_softmax(-1).gather(-1, ids))
    encoded = encode(ids, log_probs, None, V)
    decoded = torch.from_numpy(encoded.log_probs())
    assert (
        (decoded - log_probs).abs() <= torch.from_numpy(encoded.step).float().unsqueeze(-1) / 2 + 1e-5
    ).all()
    assert encoded.tail is None and np.array_equal(encoded.ids, ids.numpy())


def test_id_types_and_bytes_per_position() -> None:
    assert id_dtype(65_536) == np.uint16 and id_dtype(65_537) == np.uint32
    assert bytes_per_position("topk", 64, 4096) == 64 * 3 + 6 == 198
    assert bytes_per_position("sample", 12, 4096) == 12 * 3 + 4
    assert bytes_per_position("topk", 64, 128_256) == 64 * 5 + 6


# ------------------------------------------------------------------------------------------- shards, reader
@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_written_cache_reads_back_the_teacher_targets(tmp_path: Path, mode: str) -> None:
    cache = full_cache(tmp_path, mode, entries=8, temperature=2.0)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["complete"] and manifest["splits"]["train"]["blocks"] == 16
    assert manifest["identity"] == IDENTITY and manifest["temperature"] == 2.0
    assert not list(tmp_path.glob("part-*")) and not list(tmp_path.glob(".*"))
    # bytes per token measured on disk: the stored payload plus 8 bytes per block and a small header per shard
    shards = [r for s in manifest["splits"].values() for r in s["shards"]]
    on_disk = sum((tmp_path / r["file"]).stat().st_size for r in shards)
    positions = sum(NUM_BLOCKS.values()) * T
    assert manifest["bytes"] == on_disk and manifest["positions"] == positions
    assert manifest["bytes_per_token"] == pytest.approx(on_disk / positions)
    payload = bytes_per_position(mode, 8, V) + 8 / T
    assert payload <= manifest["bytes_per_token"] <= payload + 600 * len(shards) / positions
    # decoded targets equal the teacher's (ids exactly, log-probabilities within the bound)
    blocks = [5, 0, 12]
    targets = cache.targets("train", blocks)
    logits = LOGITS["train"][blocks]  # (3, T, V)
    assert targets.ids.shape == (3, T, 8) and targets.ids.dtype == torch.long
    if mode == "topk":
        ids, log_probs, tail = topk_targets(logits.reshape(-1, V), 8, 2.0)
        torch.testing.assert_close(targets.tail.reshape(-1), tail, atol=0.01, rtol=2**-11)
    else:
        from distilkit.data.teacher_cache.codec import block_uniforms

        uniforms = torch.cat([block_uniforms(0, "train", b, T, 8) for b in blocks])
        ids, log_probs = sample_targets(logits.reshape(-1, V), uniforms, 2.0)
        assert torch.allclose(targets.weights, torch.full_like(targets.weights, 1 / 8))
    assert torch.equal(targets.ids.reshape(-1, 8), ids)
    bound = torch.from_numpy(cache.read("train", blocks).step).float().reshape(-1, 1) / 2
    assert ((targets.log_probs.reshape(-1, 8) - log_probs).abs() <= bound + 1e-5).all()
    # a student equal to the teacher has (nearly) zero loss from the cache, at the cache temperature
    student = logits.reshape(-1, V)
    loss = ForwardKLLoss(temperature=2.0).sparse_forward(student, targets.flatten())
    assert abs(float(loss)) < 0.01
    assert pickle.loads(pickle.dumps(cache)).targets("val", [2]).ids.shape == (1, T, 8)


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_an_interrupted_write_resumes_to_the_same_cache(tmp_path: Path, mode: str) -> None:
    reference = full_cache(tmp_path / "reference", mode)
    directory = tmp_path / "resumed"
    first = writer(directory, mode)
    write_blocks(first, "train", list(range(10)))  # shards of blocks 0-3 and 4-7 on disk, 8-9 buffered
    (directory / ".train-r0000-000002.safetensors.tmp").write_bytes(b"half a shard")  # killed mid-write
    orphan = directory / "train-r0000-000003.safetensors"  # renamed, then killed before it was recorded
    orphan.write_bytes((directory / "train-r0000-000000.safetensors").read_bytes())
    del first  # dropped without close or finalize: the buffered blocks are lost
    second = writer(directory, mode)
    assert second.done("train") == set(range(8)) and second.done("val") == set()
    assert second.missing("train") == list(range(8, 16))
    for split, count in NUM_BLOCKS.items():
        write_blocks(second, split, list(range(count)))  # blocks on disk are skipped
    manifest = second.finalize()
    assert not orphan.exists() and not list(directory.glob(".*.tmp"))
    resumed = TeacherCache(directory)
    assert_same_targets(resumed, reference)
    for split, count in NUM_BLOCKS.items():  # the very same stored arrays (shard headers order keys freely)
        stored = [c.read(split, list(range(count))).arrays() for c in (resumed, reference)]
        assert all(np.array_equal(stored[0][name], stored[1][name]) for name in stored[1])
    assert manifest["bytes_per_token"] == reference.manifest["bytes_per_token"]


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_two_writers_make_the_same_cache_as_one(tmp_path: Path, mode: str) -> None:
    reference = full_cache(tmp_path / "one", mode)
    directory = tmp_path / "two"
    ranks = [writer(directory, mode, rank=rank) for rank in (0, 1)]
    for split, count in NUM_BLOCKS.items():
        for rank, w in enumerate(ranks):  # strided like a distributed sampler, which pads with a repeat
            blocks = list(range(rank, count, 2))
            write_blocks(w, split, blocks + ([0] if len(blocks) < (count + 1) // 2 else []), batch=2)
    ranks[1].close()
    ranks[0].close()
    manifest = finalize_cache(directory)
    assert manifest["complete"] and {r["rank"] for r in manifest["splits"]["train"]["shards"]} == {0, 1}
    assert_same_targets(TeacherCache(directory), reference)


def test_a_writer_refuses_a_directory_made_with_other_settings(tmp_path: Path) -> None:
    w = writer(tmp_path)
    write_blocks(w, "train", list(range(4)))
    with pytest.raises(ConfigError, match=r"cache.top_k=16: differs from 8"):
        writer(tmp_path, entries=16)
    with pytest.raises(ConfigError, match=r"cache.identity=.*differs"):
        writer(tmp_path, identity={**IDENTITY, "tokenizer_hash": "t1"})
    with pytest.raises(ConfigError, match="cache.mode"):
        writer(tmp_path, mode="sample")


def test_bad_writer_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cache.mode"):
        writer(tmp_path, mode="full")
    with pytest.raises(ConfigError, match="cache.top_k"):
        writer(tmp_path, entries=V + 1)
    with pytest.raises(ConfigError, match="cache.temperature"):
        writer(tmp_path, temperature=0.0)
    w = writer(tmp_path)
    with pytest.raises(ValueError, match=r"should be \(B, T, V\)"):
        w.write("train", [0], LOGITS["train"][:1, :, :-1])
    with pytest.raises(ValueError, match="outside"):
        w.write("train", [16], LOGITS["train"][:1])


# ----------------------------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("finished")
    full_cache(directory)
    return directory


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"identity": {**IDENTITY, "tokenizer_hash": "t1"}},
            r"identity.tokenizer_hash='t1': .* made with 't0'",
        ),
        ({"identity": {"data_fingerprint": "d1"}}, r"identity.data_fingerprint='d1': .* made with 'd0'"),
        ({"identity": {"teacher": "big"}}, r"identity.teacher='big': .* made with 'tiny'"),
        ({"identity": {"revision": "r1"}}, r"identity.revision='r1': .* made with '<not recorded>'"),
        ({"block_size": 32}, r"block_size=32: .* made with 16"),
        ({"temperature": 2.0}, r"temperature=2.0: .* made with 1.0"),
        ({"vocab_size": 512}, r"vocab_size=512: .* made with 256"),
        ({"mode": "sample"}, r"mode='sample': .* made with 'topk'"),
        ({"entries": 16}, r"top_k=16: .* made with 8"),
    ],
)
def test_check_refuses_every_mismatch(finished: Path, change: dict, message: str) -> None:
    cache = TeacherCache(finished)
    run = {"identity": IDENTITY, "block_size": T, "temperature": 1.0, "vocab_size": V, "mode": "topk"}
    cache.check(**run, entries=8)  # the matching run is accepted
    with pytest.raises(ConfigError, match=message):
        cache.check(**{**run, **change})


def copy_cache(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def first_shard(directory: Path) -> Path:
    manifest = json.loads((directory / "manifest.json").read_text())
    return directory / manifest["splits"]["train"]["shards"][0]["file"]


def test_a_truncated_shard_is_refused_and_rewritten_on_resume(finished: Path, tmp_path: Path) -> None:
    directory = copy_cache(finished, tmp_path / "cache")
    shard = first_shard(directory)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(
        ConfigError, match=r"shard train-r0000-000000.safetensors has \d+ bytes, .* \(truncated\?\)"
    ):
        TeacherCache(directory)
    with pytest.warns(UserWarning, match=r"has \d+ bytes, .*its blocks will be written again"):
        resumed = writer(directory)
    assert resumed.missing("train") == [0, 1, 2, 3]
    write_blocks(resumed, "train", list(range(16)))
    resumed.finalize()  # the manifest still names the damaged shard: finalize drops it (the writer warned)
    assert not shard.exists()  # rewritten under another name; the damaged file is gone
    assert_same_targets(TeacherCache(directory), TeacherCache(finished))


def test_corrupt_shards_and_manifests_are_refused(finished: Path, tmp_path: Path) -> None:
    flipped = copy_cache(finished, tmp_path / "flipped")
    data = bytearray(first_shard(flipped).read_bytes())
    data[-5] ^= 0xFF  # same size, different content: only the checksum sees it
    first_shard(flipped).write_bytes(bytes(data))
    repair = "run the `distilkit cache` command that made it again"
    with pytest.raises(ConfigError, match=f"has other bytes than were written .*; {repair}"):
        TeacherCache(flipped)  # opening checks what changed since it was hashed
    TeacherCache(finished).verify()

    header = copy_cache(finished, tmp_path / "header")
    data = bytearray(first_shard(header).read_bytes())
    data[8:20] = b"not json!!!!"
    first_shard(header).write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="has other bytes than were written"):
        TeacherCache(header)
    manifest = json.loads((header / "manifest.json").read_text())  # a record that matches the damage
    manifest["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (header / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="is unreadable"):
        TeacherCache(header)

    broken = copy_cache(finished, tmp_path / "broken")
    text = (broken / "manifest.json").read_text()
    (broken / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(ConfigError, match="is not a readable cache record"):
        TeacherCache(broken)
    manifest = json.loads(text)
    del manifest["splits"]["train"]["shards"][1]["sha256"]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="is incomplete or damaged"):
        TeacherCache(broken)
    (broken / "manifest.json").write_text(json.dumps({**json.loads(text), "version": 99}))
    with pytest.raises(ConfigError, match="format version 99"):
        TeacherCache(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(ConfigError, match=r"has no manifest.json \(no cache here\)"):
        TeacherCache(broken)

    moved = copy_cache(finished, tmp_path / "moved")
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["first_block"] = 1
    (moved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="holds other blocks than the manifest records"):
        TeacherCache(moved)


def test_an_unfinished_cache_is_refused_unless_partial_reads_are_allowed(tmp_path: Path) -> None:
    w = writer(tmp_path)
    write_blocks(w, "train", list(range(8)))
    with pytest.raises(ConfigError, match=r"has no manifest.json \(the cache run did not finish\)"):
        TeacherCache(tmp_path)
    w.finalize()
    with pytest.raises(ConfigError, match="holds 8 of the 16 train blocks"):
        TeacherCache(tmp_path)
    partial = TeacherCache(tmp_path, allow_partial=True)
    assert partial.targets("train", [7]).ids.shape == (1, T, 8)
    with pytest.raises(ConfigError, match=r"holds no train block \[9\]"):
        partial.targets("train", [3, 9])


# ---------------------------------------------------------------------------------------- top-k tail draws
def test_tail_draws_follow_the_tail_and_share_the_encoding() -> None:
    """The head is the plain top K; the draws lie outside it, at the teacher's log-probabilities, sorted after
    the K-th; their frequencies follow p restricted to the tail; one encoding holds all K + S entries."""
    logits = teacher_logits(1, seed=6).reshape(-1, V)[:3]  # (3, V)
    head, head_log_probs, head_tail = topk_targets(logits, 8, 2.0)
    uniforms = torch.rand(3, 20_000, generator=torch.Generator().manual_seed(0))
    ids, log_probs, tail = topk_targets(logits, 8, 2.0, uniforms)
    assert ids.shape == (3, 8 + 20_000) and torch.equal(ids[:, :8], head) and torch.equal(tail, head_tail)
    torch.testing.assert_close(log_probs[:, :8], head_log_probs)
    assert (log_probs[:, :-1] >= log_probs[:, 1:]).all(), "descending as a whole"
    draws = ids[:, 8:]
    assert not (draws.unsqueeze(-1) == head.unsqueeze(1)).any(), "never a head id"
    log_p = (logits / 2.0).log_softmax(-1)
    torch.testing.assert_close(log_probs[:, 8:], log_p.gather(-1, draws))
    frequency = torch.zeros(3, V).scatter_add_(1, draws, torch.ones(draws.shape)) / draws.shape[1]
    expected = log_p.exp().scatter(1, head, 0.0) / tail.exp().unsqueeze(-1)  # p / tail outside the head
    assert float((frequency - expected).abs().max()) < 0.01
    encoded = encode(ids[:, :40], log_probs[:, :40], tail, V)
    error = (torch.from_numpy(encoded.log_probs()) - log_probs[:, :40]).abs()
    assert (error <= torch.from_numpy(encoded.step).float().unsqueeze(-1) / 2 + 1e-5).all()
    assert bytes_per_position("topk", 32 + 32, 4096) == 198
    with pytest.raises(ValueError, match="K < V"):
        topk_targets(logits, V, 1.0, uniforms[:, :4])


def test_a_cache_with_tail_draws_reads_back_weighted_targets_the_same_from_any_writers(
    tmp_path: Path,
) -> None:
    cache = full_cache(tmp_path / "one", "topk", 8, tail_samples=6, temperature=2.0, seed=3)
    manifest = cache.manifest
    assert manifest["top_k"] == 8 and manifest["tail_samples"] == 6 and manifest["seed"] == 3
    assert manifest["bytes_per_token"] >= bytes_per_position("topk", 14, V)
    blocks = [5, 0, 12]
    targets = cache.targets("train", blocks)
    assert targets.mode == "topk" and targets.ids.shape == (3, T, 14)
    assert targets.tail_draws == 6 and targets.head == 8 and targets.weighted
    torch.testing.assert_close(targets.weights.sum(-1), torch.ones(3, T))
    from distilkit.data.teacher_cache.codec import block_uniforms

    uniforms = torch.cat([block_uniforms(3, "train", b, T, 6) for b in blocks])
    ids, log_probs, tail = topk_targets(LOGITS["train"][blocks].reshape(-1, V), 8, 2.0, uniforms)
    assert torch.equal(targets.ids.reshape(-1, 14), ids)
    mass = torch.cat([log_probs[:, :8].exp(), tail.exp().unsqueeze(-1).expand(-1, 6) / 6], -1)
    torch.testing.assert_close(
        targets.weights.reshape(-1, 14), mass / mass.sum(-1, keepdim=True), atol=2e-3, rtol=0
    )
    # two writers, strided, make the very same cache as one
    directory = tmp_path / "two"
    ranks = [writer(directory, "topk", 8, tail_samples=6, temperature=2.0, seed=3, rank=r) for r in (0, 1)]
    for split, count in NUM_BLOCKS.items():
        for rank, w in enumerate(ranks):
            write_blocks(w, split, list(range(rank, count, 2)), batch=2)
    for w in ranks:
        w.close()
    finalize_cache(directory)
    assert_same_targets(TeacherCache(directory), cache)
    with pytest.raises(ConfigError, match=r"cache.tail_samples=4: differs from 6"):
        writer(directory, "topk", 8, tail_samples=4, temperature=2.0, seed=3)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mode": "sample", "tail_samples": 4}, r"cache.tail_samples=4: applies to --mode topk only"),
        ({"entries": V, "tail_samples": 4}, r"cache.tail_samples=4: needs a tail: top_k=256"),
        ({"tail_samples": -1}, r"cache.tail_samples=-1: must be an integer >= 0"),
    ],
)
def test_bad_tail_draws_are_refused(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        writer(tmp_path, **settings)
