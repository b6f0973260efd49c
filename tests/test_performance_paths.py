"""The fast paths: blocked symmetric Gram products, batched unpacking, length-sorted batches, the
one-ahead prefetch, mmap-free safetensors reads, the estimated residual and budget-bounded batches."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from regmean_pipeline.cache.symmetric import (
    accumulate_upper_,
    mirror_upper_,
    pack_upper,
    unpack_upper,
    upper_blocks,
    upper_product_flops,
)
from regmean_pipeline.io.safetensors_io import SafetensorsReader
from regmean_pipeline.io.weights import SafetensorsCheckpoint
from regmean_pipeline.measure.data import DatasetSpec, load_examples, make_loader
from regmean_pipeline.measure.gram import collect_grams
from regmean_pipeline.merge.executor import LoadBuffers, prefetch
from regmean_pipeline.merge.solve import solve_batch
from regmean_pipeline.testing import make_model, make_tokenizer, write_text_task
from tests.conftest import read_json
from tests.reference import capture_grams, relative_error
from tests.test_merge import make_caches, merge, merged_state, reference_for


@pytest.mark.parametrize("dim", [520, 700, 1100])
def test_blocked_upper_product_equals_float64_xtx(dim):
    torch.manual_seed(dim)
    total = torch.zeros(dim, dim)
    expected = np.zeros((dim, dim))
    for rows in (50, 333):
        x = torch.randn(rows, dim)
        accumulate_upper_(total, x)
        expected += x.double().numpy().T @ x.double().numpy()
    assert len(upper_blocks(dim)) > 1
    # Nothing is computed below the block diagonal until the one mirror at the end.
    for start, stop in upper_blocks(dim):
        assert not total[stop:, start:stop].any()
    mirror_upper_(total)
    assert torch.equal(total, total.T)
    assert relative_error(total, expected) < 1e-6


def test_upper_product_does_less_work():
    assert upper_product_flops(100, 1024) == 0.625 * 2 * 100 * 1024 ** 2  # 4 block rows
    assert upper_product_flops(100, 384) == 2 * 100 * 384 ** 2  # one block: the plain product


def test_batched_unpack_into_a_buffer_round_trips():
    torch.manual_seed(0)
    x = torch.randn(3, 600, 600)
    symmetric = x + x.transpose(1, 2)
    packed = torch.stack([pack_upper(m) for m in symmetric])
    assert packed.shape == (3, 600 * 601 // 2)
    buffer = torch.full((3, 600, 600), float("nan"))
    assert unpack_upper(packed, 600, out=buffer) is buffer
    assert torch.equal(buffer, symmetric)
    assert torch.equal(unpack_upper(packed[1]), symmetric[1])


def test_wide_layers_through_collect_grams_match_float64(tmp_path):
    """Hidden 256 and MLP 640: several block rows per Gram, padding masked, against a float64 capture."""
    tokenizer = make_tokenizer(tmp_path)
    model = make_model("bert", seed=1, hidden_size=256, intermediate_size=640)
    texts = ["the movie was great and the music was very good", "bad", "why is the screen so dark",
             "it works but the battery is bad"]
    batches = [dict(tokenizer(texts[i:i + 2], padding="longest", return_tensors="pt")) for i in (0, 2)]
    batches = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in batches]
    stats = collect_grams(model, batches, device="cpu")
    singles = [{k: v for k, v in tokenizer([t], return_tensors="pt").items() if k in ("input_ids", "attention_mask")}
               for t in texts]
    reference = capture_grams(model, singles)
    wide = stats.layer_grams["bert.encoder.layer.0.output.dense"]
    assert len(upper_blocks(stats.sums[wide].shape[0])) > 1
    for name, key in stats.layer_grams.items():
        assert relative_error(stats.sums[key], reference["grams"][name]) < 1e-5, name


def test_batches_are_longest_first_with_the_same_examples(tmp_path):
    tokenizer = make_tokenizer(tmp_path)
    task = write_text_task(tmp_path / "task.jsonl", n=40, seed=3, min_words=1, max_words=30)
    spec = DatasetSpec(str(task), num_examples=40, seed=0)
    examples = load_examples(spec, images=False)
    model = make_model("bert")
    batches = list(make_loader(examples, tokenizer, spec, accepted={"input_ids", "attention_mask"},
                               config=model.config, batch_size=8))
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths, reverse=True)
    seen = sorted(tuple(ids[mask.bool()].tolist()) for b in batches for ids, mask in zip(b["input_ids"], b["attention_mask"]))
    expected = sorted(tuple(tokenizer(row["text"], truncation=True, max_length=64)["input_ids"]) for row in examples)
    assert seen == expected
    unsorted = [tokenizer([r["text"] for r in examples.select(range(i, i + 8))], padding="longest")["input_ids"]
                for i in range(0, 40, 8)]
    assert sum(b["input_ids"].numel() for b in batches) < sum(len(b) * len(b[0]) for b in unsorted)


def test_prefetch_loads_exactly_one_item_ahead():
    started = [threading.Event() for _ in range(4)]

    def load(i):
        started[i].set()
        return i * 10

    stream = prefetch(range(4), load)
    assert next(stream) == (0, 0)
    # While item 0 is held, item 1 is loaded (overlap) but item 2 is not (memory bound).
    assert started[1].wait(10)
    assert not started[2].wait(0.3)
    assert next(stream) == (1, 10)
    assert started[2].wait(10)
    assert list(stream) == [(2, 20), (3, 30)]


def test_prefetch_reraises_load_errors():
    def load(i):
        if i == 2:
            raise ValueError("bad item")
        return i

    with pytest.raises(ValueError, match="bad item"):
        list(prefetch(range(4), load))


def test_safetensors_reads_without_memory_maps(tmp_path):
    tensors = {"w": torch.randn(40, 30), "b": torch.randn(7).to(torch.bfloat16), "i": torch.arange(5),
               "s": torch.tensor(2.5), "e": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    weights = SafetensorsCheckpoint(tmp_path)
    for name, tensor in tensors.items():
        assert torch.equal(weights.get(name), tensor) and weights.dtype(name) == tensor.dtype
    assert torch.equal(weights.rows("w", 10, 13), tensors["w"][10:13])
    maps = open("/proc/self/maps").read()
    assert str((tmp_path / "model.safetensors").resolve()) not in maps


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_safetensors_reader_refuses_damaged_files(tmp_path, damage):
    path = tmp_path / "x.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-100] if damage == "truncate" else data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError):
        SafetensorsReader(path)


def test_estimated_residual_tracks_the_exact_one():
    torch.manual_seed(0)
    factor = torch.randn(3, 80, 80)
    matrix = factor @ factor.transpose(1, 2) + 0.1 * torch.eye(80)
    rhs = torch.randn(3, 80, 50)
    result = solve_batch(matrix.clone(), rhs, torch.zeros(3, 80, 50), torch.zeros(3, 80, 50))
    exact = torch.linalg.matrix_norm(matrix @ result.solution - rhs) / (
        torch.linalg.matrix_norm(matrix) * torch.linalg.matrix_norm(result.solution))
    for estimate, truth in zip(result.residual, exact.tolist()):
        assert truth / 4 <= estimate <= truth * 4


def test_solve_factors_in_place_only_when_the_matrix_can_be_rebuilt():
    """With ``rebuild`` the Cholesky factor is written over the matrix (no second (d, d) tensor); without
    it the caller's matrix is untouched. Both give the same solution."""
    torch.manual_seed(1)
    factor = torch.randn(3, 40, 40)
    matrix = factor @ factor.mT + 0.1 * torch.eye(40)
    kept, rhs = matrix.clone(), torch.randn(3, 40, 7)
    copied = solve_batch(matrix, rhs, torch.zeros(3, 40, 7), torch.zeros(3, 40, 7))
    assert torch.equal(matrix, kept)
    in_place = solve_batch(matrix, rhs, torch.zeros(3, 40, 7), torch.zeros(3, 40, 7), rebuild=kept.__getitem__)
    lower = matrix.mT.tril()  # the storage holds L column-major: the factor of the kept matrix
    assert torch.allclose(lower @ lower.mT, kept, rtol=1e-4, atol=1e-4)
    assert torch.equal(copied.solution, in_place.solution)


def test_small_batch_budget_gives_the_same_merge(workspace, cli, tmp_path):
    """Wide layers (several Gram blocks) merged in many small batches equal the float64 closed form."""
    models = [workspace.model("llama", seed, hidden_size=256, intermediate_size=576) for seed in (11, 12)]
    tasks = [workspace.text_task(seed, n=30) for seed in (11, 12)]
    caches = make_caches(cli, tmp_path, models, tasks)
    out = merge(cli, caches, tmp_path / "merged", "--batch-memory", "1MiB")
    report = read_json(out / "merge_report.json")
    assert report["totals"]["batches"] >= 8  # 5 shapes; the budget splits the equal-shaped systems
    expected = reference_for(models, tasks, 0.95)
    for name, tensor in merged_state(out).items():
        assert relative_error(tensor, expected[name]) < 1e-4, name  # all float32, as test_merge


def test_load_buffers_are_reused_across_shapes_and_stay_few():
    """The loader's batch storage is handed out again for any shape and dtype that fits; a request that
    fits none replaces the largest free buffer instead of adding one."""
    buffers = LoadBuffers()
    first, flat = buffers.take((4, 100), torch.float32)
    assert first.shape == (4, 100) and first.dtype == torch.float32
    buffers.give_back(flat)
    second, same = buffers.take((10, 10), torch.float64)  # 800 of 1600 bytes: the same storage
    assert same.data_ptr() == flat.data_ptr() and second.shape == (10, 10) and second.dtype == torch.float64
    buffers.give_back(same)
    _, larger = buffers.take((1000,), torch.float32)
    assert larger.numel() == 4000 and larger.data_ptr() != flat.data_ptr() and buffers._free == []
