"""Documents -> cached token files -> windows; local files, Hub-shaped folders and bad data."""

import json
import os
import socket
import stat

import numpy as np
import pytest
from conftest import make_datamodule

from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.data.tokens import TextDataModule, TokenWindows
from llmtrain.errors import UserError


def write_paragraphs(path, n=60):
    path.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(n)))
    return path


def make_dm(tmp_path, **kw) -> TextDataModule:
    args = dict(source="text", sample_by="paragraph", tokenizer="bytes", context_length=16, batch_size=4, num_proc=1,
                cache_dir=str(tmp_path / "cache"), val_fraction=0.2) | kw
    return make_datamodule("embedded", **args)


def test_text_files_tokenize_to_windows_shifted_by_one(tmp_path):
    f = write_paragraphs(tmp_path / "a.txt")
    dm = make_dm(tmp_path, path=str(f))
    dm.prepare_data()
    dm.setup("fit")
    meta = dm.cache.meta
    assert meta["documents"]["train"] + meta["documents"]["val"] == 60
    assert 0 < meta["documents"]["val"] < 25
    assert meta["dtype"] == "uint16"
    sample = dm.train_set[0]
    assert sample["input_ids"].shape == (16,) and sample["labels"].shape == (16,)
    assert np.array_equal(sample["input_ids"][1:], sample["labels"][:-1])
    # documents are joined with <|endoftext|>
    tokens = dm.cache.tokens("train")
    assert (tokens == build_tokenizer("bytes").eot_token).sum() == meta["documents"]["train"]
    assert sum(meta["tokens"].values()) == len(tokens) + len(dm.cache.tokens("val"))


def test_second_run_reuses_the_cache_and_a_changed_file_does_not(tmp_path):
    f = write_paragraphs(tmp_path / "a.txt")
    dm = make_dm(tmp_path, path=str(f))
    dm.prepare_data()
    stamp = os.stat(dm.cache.dir / "meta.json").st_mtime_ns
    again = make_dm(tmp_path, path=str(f))
    assert again.cache.dir == dm.cache.dir and again.cache.exists()
    again.prepare_data()
    assert os.stat(dm.cache.dir / "meta.json").st_mtime_ns == stamp
    assert make_dm(tmp_path, path=str(f), val_fraction=0.3).cache.dir != dm.cache.dir  # another split
    write_paragraphs(f, n=70)
    assert make_dm(tmp_path, path=str(f)).cache.dir != dm.cache.dir
    assert make_dm(tmp_path, path=str(f), tokenizer="gpt2").cache.dir != dm.cache.dir


def test_a_build_removes_what_killed_builds_of_this_machine_left_and_its_cache_is_readable_by_all(tmp_path):
    """A tokenization killed half-way leaves a .building-<host>-<pid>-* folder: the next build removes it (its
    process is gone); a live one, or one of another machine sharing the cache, stays. The cache folder has the
    user's umask, not mkdtemp's 0700 (a second user of a shared cache could not read it)."""
    f = write_paragraphs(tmp_path / "a.txt")
    dm = make_dm(tmp_path, path=str(f))
    root = dm.cache.dir.parent
    root.mkdir(parents=True)
    host = socket.gethostname()
    dead = 2**22 + 7  # beyond the largest pid_max: no such process
    for name in (f"{host}-{dead}-abc", f"{host}-{os.getpid()}-def", f"elsewhere-{dead}-ghi"):
        (root / f".building-{name}").mkdir()
        (root / f".building-{name}" / "train.bin").write_bytes(b"\0" * 64)
    old = os.umask(0o022)
    try:
        dm.prepare_data()
    finally:
        os.umask(old)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".building-")) == [
        f".building-elsewhere-{dead}-ghi", f".building-{host}-{os.getpid()}-def"]
    assert stat.S_IMODE(dm.cache.dir.stat().st_mode) == 0o755


def test_globs_and_json_and_parquet_sources(tmp_path):
    for i in range(3):
        write_paragraphs(tmp_path / f"book{i}.txt", n=20)
    dm = make_dm(tmp_path, path=str(tmp_path / "book*.txt"))
    dm.prepare_data()
    assert sum(dm.cache.meta["documents"].values()) == 60

    rows = [{"body": f"Story {i} about a cat and a hat."} for i in range(50)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dm = make_dm(tmp_path, source="json", path=str(tmp_path / "d.jsonl"), text_column="body")
    dm.prepare_data()
    assert sum(dm.cache.meta["documents"].values()) == 50


def test_hub_loader_reads_a_folder_in_hub_layout(tmp_path):
    """`source: hub` calls datasets.load_dataset(name, ...); a local folder of parquet shards in the Hub's
    layout (data/train-*.parquet, column `text`, as TinyStories and FineWeb-Edu have) takes the same path."""
    import datasets

    repo = tmp_path / "fake-tinystories"
    (repo / "data").mkdir(parents=True)
    ds = datasets.Dataset.from_dict({"text": [f"Once upon a time there was a dog number {i}." for i in range(80)]})
    ds.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    for streaming in (False, True):
        dm = make_dm(tmp_path, source="hub", path=str(repo), streaming=streaming, max_documents=70,
                     cache_dir=str(tmp_path / f"cache{streaming}"))
        dm.prepare_data()
        dm.setup("fit")
        assert sum(dm.cache.meta["documents"].values()) == 70


def test_a_hub_dataset_is_read_at_data_revision_and_its_tokens_cached_per_revision(tmp_path, monkeypatch):
    """Two revisions of one Hub dataset are two corpora: each is read at its revision and tokenized into a cache of
    its own; the same revision again reads its cache."""
    import datasets

    asked = []

    def load_dataset(path, subset, split, streaming, revision):
        asked.append((path, revision))
        return datasets.Dataset.from_dict({"text": [f"Story {i} as of {revision}. " * 4 for i in range(40)]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    folders = []
    for revision in (None, "v1", "v2", "v1"):
        dm = make_dm(tmp_path, source="hub", path="someone/stories", sample_by=None, revision=revision)
        dm.prepare_data()
        folders.append(dm.cache.dir)
    assert asked == [("someone/stories", None), ("someone/stories", "v1"), ("someone/stories", "v2")]
    assert len(set(folders)) == 3 and folders[1] == folders[3]


def test_a_document_that_is_not_text_is_one_line_naming_its_row(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "Some words here."}\n{"text": "More."}\n{"text": null}\n')
    with pytest.raises(UserError, match=r"^data: document 2 \(counting from 0\) has text=None, not text: fix or "
                                        r"drop that row \(data.text_column names the column read\)$"):
        make_dm(tmp_path, source="json", path=str(f)).prepare_data()


def test_missing_path_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"data.path='.*nope/\*.txt' matches no file"):
        make_dm(tmp_path, path=str(tmp_path / "nope" / "*.txt"))


def test_empty_file_is_a_user_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="is empty"):
        make_dm(tmp_path, path=str(tmp_path / "empty.txt"))


def test_corpus_shorter_than_one_window_is_a_user_error(tmp_path):
    (tmp_path / "short.txt").write_text("Too short.")
    dm = make_dm(tmp_path, path=str(tmp_path / "short.txt"))
    dm.prepare_data()
    with pytest.raises(UserError, match="fewer than one window"):
        dm.setup("fit")


def test_wrong_text_column_is_a_user_error(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    dm = make_dm(tmp_path, source="json", path=str(tmp_path / "d.jsonl"))
    with pytest.raises(UserError, match=r"data.text_column='text' is not a column .*columns: body"):
        dm.prepare_data()


def test_token_windows_cover_the_stream_without_overlap(tmp_path):
    arr = np.arange(101, dtype=np.uint16)
    arr.tofile(tmp_path / "t.bin")
    w = TokenWindows(tmp_path / "t.bin", "uint16", 10)
    assert len(w) == 10
    assert w[3]["input_ids"].tolist() == list(range(30, 40))
    assert w[9]["labels"].tolist() == list(range(91, 101))


def test_a_window_needs_its_last_target(tmp_path):
    """100 tokens make 9 windows of 10 + 1: a tenth would lack the target of its last position."""
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "t.bin")
    w = TokenWindows(tmp_path / "t.bin", "uint16", 10)
    assert len(w) == 9 and w[8]["labels"].tolist() == list(range(81, 91))


def test_documents_end_with_end_of_text_and_a_split_of_one_window_is_enough(tmp_path):
    """Rows 0-3 go to train and row 4 to val at val_fraction 0.2 (the fixed rule on the index); the val document
    and its <|endoftext|> are exactly one window of context_length 7 + 1."""
    docs = ["first doc", "second", "third one", "fourth", "fifth!!"]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    dm = make_dm(tmp_path, source="json", path=str(tmp_path / "d.jsonl"), context_length=7, batch_size=3)
    dm.prepare_data()
    dm.setup("fit")
    eot = build_tokenizer("bytes").eot_token
    as_tokens = lambda texts: [t for d in texts for t in [*d.encode(), eot]]  # noqa: E731
    assert dm.cache.tokens("train").tolist() == as_tokens(docs[:4])
    assert dm.cache.tokens("val").tolist() == as_tokens(docs[4:])
    assert len(dm.val_set) == 1 and len(dm.train_set) == 4  # 34 train tokens: 4 windows of 7 + 1
    assert [len(b["input_ids"]) for b in dm.train_dataloader()] == [3]  # the short last batch is dropped


def test_resumable_loader_continues_the_epoch_where_the_checkpoint_left_it():
    """The loader's state after k finished batches, loaded into a fresh loader, gives the rest of the epoch.

    In Lightning's order: the state is loaded and the first iterator built before set_epoch is called."""
    import torch

    from llmtrain.data.loaders import ResumableLoader

    data = torch.arange(50)

    def loader(done=lambda: 0):
        return ResumableLoader(data, batch_size=4, shuffle=True, seed=7, batches_done=done, drop_last=True)

    whole = loader()
    whole.sampler.set_epoch(3)
    epoch3 = [b.tolist() for b in whole]
    whole.sampler.set_epoch(4)
    epoch4 = [b.tolist() for b in whole]
    assert len(epoch3) == 12 and sorted(sum(epoch3, [])) != sum(epoch3, [])  # 12 batches of a shuffled order
    assert epoch3 != epoch4  # the order depends on the epoch

    first = loader(done=lambda: 5)  # 5 batches trained (more may have been fetched ahead)
    first.sampler.set_epoch(3)
    state = first.state_dict()
    assert state == {"epoch": 3, "seed": 7, "batch_size": 4, "num_replicas": 1, "samples_done": 20}

    resumed = loader()
    resumed.load_state_dict(state)
    rest = iter(resumed)  # Lightning: iterator first, set_epoch after
    resumed.sampler.set_epoch(3)
    assert len(resumed) == 12  # Lightning counts the epoch's batches from the full length
    assert [b.tolist() for b in rest] == epoch3[5:]
    assert [b.tolist() for b in resumed] == epoch3  # only the first pass after a resume starts part-way

    ended = loader()
    ended.load_state_dict(first.state_dict() | {"samples_done": 48})  # saved after the epoch's last batch
    assert [b.tolist() for b in ended] == epoch4  # the next epoch, from its beginning

    with pytest.warns(UserWarning, match="batch size, ranks"):
        loader().load_state_dict(state | {"batch_size": 8})


@pytest.mark.parametrize("rank", [0, 1])
def test_resumable_loader_resumes_each_of_two_ranks_at_its_own_position(monkeypatch, rank):
    """With two ranks, samples_done counts both ranks' batches; each rank resumes at its own share's offset."""
    import torch

    import llmtrain.data.loaders as resume

    monkeypatch.setattr(resume, "world", lambda: (2, rank))
    data = torch.arange(50)  # 25 samples a rank: 6 batches of 4

    def loader(done=lambda: 0):
        return resume.ResumableLoader(data, batch_size=4, shuffle=True, seed=7, batches_done=done, drop_last=True)

    whole = loader()
    whole.sampler.set_epoch(3)
    epoch3 = [b.tolist() for b in whole]
    assert len(epoch3) == 6

    first = loader(done=lambda: 3)  # 3 batches trained on each rank
    first.sampler.set_epoch(3)
    state = first.state_dict()
    assert (state["num_replicas"], state["samples_done"]) == (2, 24)  # 3 batches x 4 x 2 ranks

    resumed = loader()
    resumed.load_state_dict(state)
    assert [b.tolist() for b in resumed] == epoch3[3:]


def test_creating_loaders_draws_nothing_from_the_global_generator(tmp_path):
    import torch

    dm = make_dm(tmp_path, path=str(write_paragraphs(tmp_path / "a.txt")))
    dm.prepare_data()
    dm.setup("fit")
    state = torch.get_rng_state()
    next(iter(dm.train_dataloader()))
    next(iter(dm.val_dataloader()))
    assert torch.equal(torch.get_rng_state(), state)  # validation between steps cannot shift dropout
