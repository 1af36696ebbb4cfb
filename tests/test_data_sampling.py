"""Sampling rules (large_models/tasks.py and run.py; LM-BFF's generate_k_shot_data.py) against
transcriptions of the original code, which
uses numpy's global generator under temp_seed / np.random.seed."""

import contextlib
import filecmp
import os
from pathlib import Path

import numpy as np
import pytest

import data
from data import kshot
from data.sampling import icl_demo_sets, icl_splits, opt_splits, sample_subset, train_dev_split


@contextlib.contextmanager
def temp_seed(seed):  # utils.py
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def original_sample_subset(rows, seed, num):  # tasks.py Dataset.sample_subset
    with temp_seed(seed):
        return [rows[i] for i in np.random.permutation(len(rows)).tolist()[:num]]


def test_random_state_equals_seeded_global_generator():
    for seed in (0, 1, 42, 13, 9999):
        np.random.seed(seed)
        assert (
            np.random.permutation(5000).tolist()
            == np.random.RandomState(seed).permutation(5000).tolist()
        )
        assert (
            sample_subset(5000, seed, 1500)
            == np.random.RandomState(seed).permutation(5000)[:1500].tolist()
        )
    np.random.seed(0)
    assert (
        np.random.randint(0, 10000, 50).tolist()
        == np.random.RandomState(0).randint(0, 10000, 50).tolist()
    )
    lines = [f"line {i}" for i in range(300)]
    np.random.seed(21)
    np.random.shuffle(lines)  # generate_k_shot_data.py shuffles a list of lines
    assert lines == [f"line {i}" for i in np.random.RandomState(21).permutation(300)]
    # pandas sample(n, random_state=42) -> RandomState(42).choice(n, size, replace=False) ->
    # permutation[:size]
    assert (
        np.random.RandomState(42).choice(2210, 1000, replace=False)
        == np.random.RandomState(42).permutation(2210)[:1000]
    ).all()


def test_default_sizes_1000_500_1000():
    train, valid = list(range(5000)), [f"v{i}" for i in range(5000)]
    parts = opt_splits(data.get_task("SST2"), {"train": train, "valid": valid})
    picked = original_sample_subset(train, 0, 1500)
    assert parts["train"] == picked[:-500] and parts["dev"] == picked[-500:]
    assert parts["test"] == original_sample_subset(valid, 0, 1000)
    assert (len(parts["train"]), len(parts["dev"]), len(parts["test"])) == (1000, 500, 1000)
    other = opt_splits(data.get_task("SST2"), {"train": train, "valid": valid}, seed=3)
    assert other["train"] == original_sample_subset(train, 3, 1500)[:-500]


@pytest.mark.parametrize(
    "name,n_train,n_valid,sizes",
    [
        ("CB", 250, 56, (150, 100, 56)),
        ("Copa", 400, 100, (300, 100, 100)),
        ("WSC", 554, 104, (54, 500, 104)),
        ("opt/RTE", 2490, 277, (1000, 500, 277)),
    ],
)
def test_small_datasets(name, n_train, n_valid, sizes):
    parts = opt_splits(
        data.get_task(name), {"train": list(range(n_train)), "valid": list(range(n_valid))}
    )
    assert (len(parts["train"]), len(parts["dev"]), len(parts["test"])) == sizes
    picked = original_sample_subset(list(range(n_train)), 0, 1000 + sizes[1])
    assert parts["dev"] == picked[-sizes[1] :] and parts["train"] == picked[: -sizes[1]]
    # permuted even when all fit
    assert parts["test"] == original_sample_subset(list(range(n_valid)), 0, 1000)


def test_no_dev_and_too_small():
    assert train_dev_split(list(range(10)), 0, 4, None) == (
        original_sample_subset(list(range(10)), 0, 4),
        [],
    )
    with pytest.raises(data.DataError, match="num_dev=500"):
        train_dev_split(list(range(80)), 0, 1000, 500)


def test_icl_one_demo_set_per_example():
    train, valid = list(range(700)), list(range(300))
    with temp_seed(0):  # sample_train_sets with seed None, num_train_sets None
        seeds = np.random.randint(0, 10000, 1000)
    expected = [original_sample_subset(train, s, 32) for s in seeds]
    assert icl_demo_sets(train, 1000, 32) == expected
    test, demos = icl_splits({"train": train, "valid": valid}, num_demos=32, num_eval=1000)
    assert test == original_sample_subset(valid, 0, 1000) and demos == expected[:300]
    assert icl_splits({"train": train, "valid": valid}, num_demos=0, num_eval=None)[1] == [[]] * 300


def test_evaluation_and_a_data_seed_0_training_run_score_the_same_test_rows():
    """make demo and make results compare eval.py's zero-shot and ICL rows with train.py runs of
    --train_set_seed 0 on one test set; another data seed draws another."""
    task = data.get_task("SST2")
    splits = {"train": list(range(700)), "valid": list(range(300))}
    test = icl_splits(splits, num_demos=0, num_eval=100)[0]
    assert test == opt_splits(task, splits, 200, 50, 100, seed=0)["test"]
    assert test != opt_splits(task, splits, 200, 50, 100, seed=1)["test"]


def test_deterministic_and_independent_of_order():
    splits = {name: data.get_task(name).load() for name in ("SST2", "Copa", "SQuAD")}
    first = {
        n: opt_splits(data.get_task(n), s, num_train=20, num_dev=8, num_eval=10)
        for n, s in splits.items()
    }
    np.random.seed(1234)
    state = np.random.get_state()
    again = {
        n: opt_splits(data.get_task(n), splits[n], num_train=20, num_dev=8, num_eval=10)
        for n in reversed(splits)
    }
    icl_demo_sets(splits["SST2"]["train"], 10, 4)
    assert again == first
    after = np.random.get_state()
    # no global RNG leak
    assert after[0] == state[0] and (after[1] == state[1]).all() and after[2:] == state[2:]


# ---- k-shot (LM-BFF generate_k_shot_data.py) --------------------------------------------------
def original_kshot(lines, label_of, k, seed):
    """Transcription of generate_k_shot_data.py's train/dev selection."""
    np.random.seed(seed)
    lines = list(lines)
    np.random.shuffle(lines)
    by_label = {}
    for line in lines:
        by_label.setdefault(label_of(line), []).append(line)
    return (
        [x for v in by_label.values() for x in v[:k]],
        [x for v in by_label.values() for x in v[k : 2 * k]],
    )


@pytest.mark.parametrize("name", ["SST-2", "sst-5", "SNLI", "MNLI", "RTE", "trec"])
def test_kshot_matches_original(name):
    task = data.get_task(name, family="roberta")
    folder = os.path.join(data.SAMPLES_DIR, "original", name)
    rows = kshot.read_original(task, folder)[1]  # the original's train lines without the header
    label_of = (lambda r: int(r[1][0])) if task.csv else (lambda r: r[1].strip().split("\t")[-1])
    for k in (16, 512):
        for seed in (13, 21, 42, 87, 100):
            split = kshot.generate(task, folder, k, seed)
            train, dev = original_kshot(rows, label_of, k, seed)
            assert split["train"] == train and split["dev"] == dev
            counts = {}
            for r in rows:
                counts[label_of(r)] = counts.get(label_of(r), 0) + 1
            assert len(train) == sum(min(k, c) for c in counts.values())


def test_kshot_test_cap_1000(tmp_path):
    sst2, trec = data.get_task("SST-2", family="roberta"), data.get_task("trec")
    os.makedirs(tmp_path / "SST-2"), os.makedirs(tmp_path / "trec")
    dev = [f"sentence {i}\t{i % 2}\n" for i in range(1500)]
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + "".join(dev[:40]))
    (tmp_path / "SST-2" / "dev.tsv").write_text("sentence\tlabel\n" + "".join(dev))
    test = [line for _, line in kshot.generate(sst2, str(tmp_path / "SST-2"), 16, 13)["test"]]
    np.random.seed(42)
    np.random.shuffle(dev)
    assert test == dev[:1000]
    rows = [f"{i % 6},question {i} ?\n" for i in range(2210)]
    (tmp_path / "trec" / "train.csv").write_text("".join(rows[:60]))
    (tmp_path / "trec" / "test.csv").write_text("".join(rows))
    test = [raw for _, raw in kshot.generate(trec, str(tmp_path / "trec"), 16, 13)["test"]]
    assert test == [
        rows[i].strip().split(",") for i in np.random.RandomState(42).permutation(2210)[:1000]
    ]
    small = kshot.generate(sst2, os.path.join(data.SAMPLES_DIR, "original", "SST-2"), 16, 42)[
        "test"
    ]
    dev_lines = (
        Path(data.SAMPLES_DIR, "original", "SST-2", "dev.tsv").read_text().splitlines(keepends=True)
    )
    assert [line for _, line in small] == dev_lines[1:]


def test_bundled_kshot_folders_regenerate_byte_for_byte(tmp_path):
    for name, task in data.MLM_TASKS.items():
        folder = kshot.write_folder(
            task, os.path.join(data.SAMPLES_DIR, "original", name), str(tmp_path), 16, 42
        )
        shipped = os.path.join(data.SAMPLES_DIR, "k-shot-1k-test", name, "16-42")
        files = sorted(os.listdir(shipped))
        assert files == sorted(os.listdir(folder))
        match, mismatch, errors = filecmp.cmpfiles(shipped, folder, files, shallow=False)
        assert not mismatch and not errors
        if not task.csv:  # train/dev keep the train header, test*.tsv the header of their dev file
            first = lambda *p: Path(*p).read_text().splitlines()[0]  # noqa: E731
            original = os.path.join(data.SAMPLES_DIR, "original", name)
            assert (
                first(folder, "train.tsv")
                == first(folder, task.dev_name + ".tsv")
                == first(original, "train.tsv")
            )
            for dev in task.original_eval:
                assert first(folder, dev.replace("dev", "test") + ".tsv") == first(
                    original, dev + ".tsv"
                )


def test_kshot_loading_from_folder_or_generated(tmp_path):
    """A ready folder and on-the-fly generation from original/ give the same samples."""
    for name in ("SST-2", "trec", "MNLI"):
        task = data.get_task(name, family="roberta")
        os.makedirs(tmp_path / "original")
        os.symlink(os.path.join(data.SAMPLES_DIR, "original", name), tmp_path / "original" / name)
        generated, shipped = task.load(str(tmp_path), k=16, seed=42), task.load(k=16, seed=42)
        assert generated == shipped
        for split in ("train", "dev"):
            labels = [s.correct_candidate for s in shipped[split]]
            assert all(labels.count(lab) <= 16 for lab in task.labels)
        os.remove(tmp_path / "original" / name), os.rmdir(tmp_path / "original")
    assert {
        k: len(v) for k, v in data.get_task("SST-2", family="roberta").load(seed=13).items()
    } == {"train": 32, "dev": 32, "test": 120}
