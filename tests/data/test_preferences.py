"""Preference data for DPO: the shipped pairs and their splits, the batch layout, truncation, json/parquet/Hub
presets in the prompt/chosen/rejected columns, and the one-line refusals."""

import json

import datasets
import pytest
from conftest import make_datamodule

from llmtrain.data.prompts import format_prompt
from llmtrain.data.sources import SPLITS, load_table_splits
from llmtrain.data.tokenizer import build_tokenizer
from llmtrain.errors import UserError


def pairs(n: int, long: bool = False) -> dict[str, list[str]]:
    return {"prompt": [f"Name the number after {i}." for i in range(n)],
            "chosen": [f"{i + 1}" + (" and so on" * 30 if long else "") for i in range(n)],
            "rejected": [f"{i + 2}" for i in range(n)]}


def test_shipped_pairs_come_from_the_instruct_records_of_their_own_split():
    """chosen is the requested headword's own definition; rejected another one's of the same split, so that val
    and test pairs hold nothing from the training split (which is all pretraining may see)."""
    pref = load_table_splits("embedded", None, "preference", "train", None, 0.1, 0.1)
    inst = load_table_splits("embedded", None, "instruct", "train", None, 0.1, 0.1)
    for s in SPLITS:
        assert len(pref[s]) == len(inst[s]) > 200
        assert [r["prompt"] for r in pref[s]] == [r["instruction"] for r in inst[s]]
        assert [r["chosen"] for r in pref[s]] == [r["output"] for r in inst[s]]
        assert all(r["rejected"] != r["chosen"] for r in pref[s])
        own = {r["output"] for r in inst[s]}
        assert all(r["rejected"] in own for r in pref[s])  # from the same split
        assert len({r["rejected"] for r in pref[s]}) > 0.95 * len(own)  # each definition rejected about once
    val_devil = [r for r in pref["val"] if "Devil" in r["prompt"]]
    assert 0 < len(val_devil) < len(pref["val"])  # both books, so some pairs differ in voice


def test_a_batch_is_the_chosen_rows_then_the_rejected_rows_of_the_same_prompts():
    dm = make_datamodule("preference_embedded", tokenizer="bytes", context_length=2048, max_length=None, batch_size=3)
    dm.setup()
    tok = build_tokenizer("bytes")
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape[0] == batch["labels"].shape[0] == batch["lengths"].shape[0] == 6
    for i in range(3):
        record = dm.records["val"][i]
        prompt = tok.encode_ordinary(format_prompt(record["prompt"]))  # in the instruct template
        for row, side in ((i, "chosen"), (i + 3, "rejected")):
            n = int(batch["lengths"][row])
            ids, labels = batch["input_ids"][row, :n].tolist(), batch["labels"][row].tolist()
            assert ids[: len(prompt)] == prompt
            response = tok.encode_ordinary(record[side]) + [tok.eot_token]
            assert [t for t in labels if t != -100] == response  # only the response (and one end) is scored
            assert labels[: len(prompt) - 1] == [-100] * (len(prompt) - 1)
            assert all(t == -100 for t in labels[n:])  # padding


def write_jsonl(path, rows: dict[str, list[str]]) -> str:
    path.write_text("\n".join(json.dumps(dict(zip(rows, v, strict=True))) for v in zip(*rows.values(), strict=True)))
    return str(path)


def test_pairs_left_without_a_response_token_are_dropped_or_refused(tmp_path):
    """data.max_length cuts prompt + response; a pair whose prompt alone fills it has nothing to compare."""
    rows = pairs(60, long=True)
    rows["prompt"] = [p if i % 3 else "a long question " * 40 for i, p in enumerate(rows["prompt"])]  # 640 chars
    dm = make_datamodule("preference_json", path=write_jsonl(tmp_path / "some.jsonl", rows), tokenizer="bytes",
                         context_length=512, max_dropped_fraction=0.5)  # a third: allowed
    dm.setup()
    for s in SPLITS:
        kept = [r for r in dm.records[s] if len(r["prompt"]) < 100]
        assert 0 < len(dm.sets[s]) == len(kept) < len(dm.records[s]) or s != "train"
        assert len(dm.sets[s]) == len(kept)
    longest = max(len(ids) for pair in dm.sets["train"].items for ids in (pair[0], pair[2]))
    assert longest == 256  # the long answers were cut to data.max_length, not dropped
    with pytest.raises(UserError, match=r"^\d+ of \d+ train pairs \(\d+%\) lose their whole response to truncation at "
                                        r"data.max_length=256, more than data.max_dropped_fraction=0.1: "):
        make_datamodule("preference_json", path=str(tmp_path / "some.jsonl"), tokenizer="bytes",
                        context_length=512).setup()  # the preset's share

    rows["prompt"] = ["a long question " * 40] * 60
    dm = make_datamodule("preference_json", path=write_jsonl(tmp_path / "all.jsonl", rows), tokenizer="bytes",
                         context_length=512)
    with pytest.raises(UserError, match="no train pair keeps a response token after truncation to "
                                        "data.max_length=256: raise data.max_length"):
        dm.setup()


def test_json_parquet_and_hub_presets_read_the_prompt_chosen_rejected_columns(tmp_path):
    rows = pairs(60)
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    # data=truthy_dpo names a Hub dataset with one parquet file and extra columns; a local folder of that shape
    hub = tmp_path / "truthy-dpo-v0.1"
    hub.mkdir()
    extra = {"id": [str(i) for i in range(60)], "source": ["s"] * 60, "system": ["You are helpful."] * 60}
    datasets.Dataset.from_dict(extra | rows).to_parquet(str(hub / "truthy-dpo.parquet"))
    sizes = {}
    for preset, path in (("preference_json", tmp_path / "pairs.jsonl"), ("preference_parquet",
                         tmp_path / "pairs.parquet"), ("truthy_dpo", hub)):
        dm = make_datamodule(preset, path=str(path), tokenizer="gpt2", context_length=64)
        dm.setup()
        sizes[preset] = {s: len(dm.sets[s]) for s in SPLITS}
        assert set(dm.records["train"][0]) == {"prompt", "chosen", "rejected"}
        assert sum(sizes[preset].values()) == 60
    assert sizes["preference_json"] == sizes["preference_parquet"]  # the same rule on the row index
    assert sizes["truthy_dpo"]["val"] < sizes["preference_json"]["val"]  # its preset holds out 5%, not 10%


def test_other_column_names(tmp_path):
    rows = pairs(30)
    renamed = {"question": rows["prompt"], "good": rows["chosen"], "bad": rows["rejected"]}
    datasets.Dataset.from_dict(renamed).to_parquet(str(tmp_path / "orca.parquet"))
    with pytest.raises(UserError, match=r"the train rows have no column 'prompt', 'chosen', 'rejected' \(columns: "
                                        r"question, good, bad\): set data.prompt_column"):
        make_datamodule("preference_parquet", path=str(tmp_path / "orca.parquet"), tokenizer="gpt2").setup()
    dm = make_datamodule("preference_parquet", path=str(tmp_path / "orca.parquet"), tokenizer="gpt2",
                         prompt_column="question", chosen_column="good", rejected_column="bad")
    dm.setup()
    assert dm.records["train"][0]["prompt"].startswith("Name the number")


def test_the_build_script_pairs_each_entry_with_another_of_its_own_split():
    """scripts/build_datasets.py on made-up entries: rejected from the same split, never the entry's own answer,
    each answer rejected once, the same pairs on every run."""
    from conftest import build_script

    script = build_script()
    entries = [script.Entry(source, f"term{i}", "", f"what {source} says of term{i}, at some length", "")
               for i in range(60) for source in ("devil", "jargon")]
    out = script.preference_records(entries)
    assert out == script.preference_records(entries)
    for split, records in out.items():
        own = [e for e in entries if script.split_of(e.source, e.term) == split]
        assert [r["chosen"] for r in records] == [script.answer_of(e) for e in own]
        assert [r["prompt"] for r in records] == [script.instruction_of(e) for e in own]
        assert all(r["rejected"] != r["chosen"] for r in records)
        assert {r["rejected"] for r in records} <= {r["chosen"] for r in records}
        assert len({r["rejected"] for r in records}) >= len(records) - 2
    # two headwords with one definition (there are such in the Jargon File) are never each other's rejected one
    words = [w for w in (f"w{i}" for i in range(200)) if script.split_of("jargon", w) == "test"][:3]
    same = "See the other entry, which says it all."
    few = [script.Entry("jargon", w, "", body, "") for w, body in zip(words, [same, same, "Something else entirely."])]
    records = script.preference_records(few)["test"]
    assert len(records) == 3 and all(r["rejected"] != r["chosen"] for r in records)
    assert script.preference_records(few[:2]) == {"train": [], "val": [], "test": []}  # nothing else to reject


def test_max_train_samples_keeps_the_first_pairs(tmp_path):
    """data.max_train_samples (debug=overfit: one batch) applies to DPO's pairs as to the other tables."""
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs(60))
    full = make_datamodule("preference_json", path=path, tokenizer="bytes", context_length=512)
    full.setup()
    dm = make_datamodule("preference_json", path=path, tokenizer="bytes", context_length=512, max_train_samples=4)
    dm.setup()
    assert dm.sets["train"].items == full.sets["train"].items[:4]
    assert len(dm.sets["val"]) == len(full.sets["val"])  # evaluation keeps every pair
