"""The shipped data (scripts/build_datasets.py): what the stages hold out is nowhere in the pretraining corpus."""

import numpy as np
from conftest import make_datamodule


def normalise(text: str) -> str:
    return " ".join(text.split())


def pretraining_documents() -> dict[str, list[str]]:
    """The documents of the default run's corpus (data=embedded, GPT-2 BPE), split into train and val exactly as
    TextDataModule splits them, read back from its token files."""
    dm = make_datamodule("embedded", tokenizer="gpt2", context_length=128)
    dm.prepare_data()
    dm.setup("fit")
    tok = dm.tokenizer
    docs = {}
    for split in ("train", "val"):
        ids = np.asarray(dm.cache.tokens(split))
        ends = np.flatnonzero(ids == tok.eot_token)
        starts = np.concatenate([[0], ends[:-1] + 1])
        docs[split] = [normalise(tok.decode(ids[s:e].tolist())) for s, e in zip(starts, ends, strict=True)]
    return docs


def held_out_texts() -> list[str]:
    """Every val and test text of the shipped stage sets: classify texts and instruct answers (a cut answer ends in
    ' ...', which is not in the source), whitespace-normalised."""
    texts = []
    for preset, column in (("classify_embedded", "text"), ("instruct_embedded", "output")):
        rows = make_datamodule(preset, tokenizer="gpt2", context_length=128).load_rows()
        texts += [normalise(r[column]).removesuffix(" ...") for split in ("val", "test") for r in rows[split]]
    return texts


def test_no_stage_val_or_test_text_is_in_the_pretraining_corpus():
    """Containment, not equality: classify texts are definitions cut to 600 characters and instruct answers cut
    to 400, so a held-out record is a piece of the entry it came from."""
    docs, held_out = pretraining_documents(), held_out_texts()
    assert len(docs["train"]) > 2000 and len(docs["val"]) > 50 and len(held_out) > 1000  # the reads found the data
    for split in ("train", "val"):
        corpus = "\n".join(docs[split])  # no held-out text holds a newline after normalising: no match spans two
        inside = [text for text in held_out if text in corpus]
        assert not inside, f"{len(inside)} held-out stage texts are in the pretraining {split} split: {inside[:3]}"


def test_the_split_rule_puts_buckets_0_to_79_in_train_80_to_89_in_val_and_90_to_99_in_test():
    """The held-out splits of every shipped stage set come from sha1("source:term") mod 100; an off-by-one at a
    boundary would move headwords between train, val and test unseen."""
    import hashlib

    from conftest import build_script

    split_of = build_script().split_of
    wanted = {0: "train", 79: "train", 80: "val", 89: "val", 90: "test", 99: "test"}
    found: dict[int, str] = {}
    i = 0
    while len(found) < len(wanted):
        term = f"term{i}"
        bucket = int(hashlib.sha1(f"devil:{term}".encode()).hexdigest(), 16) % 100
        if bucket in wanted and bucket not in found:
            found[bucket] = split_of("devil", term)
        i += 1
    assert found == wanted
