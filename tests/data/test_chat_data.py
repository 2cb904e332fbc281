"""The shipped conversations (scripts/build_chat_data.py): rebuilt byte for byte from the instruct sets, every
answer its own split's, and every conversation readable."""

import gzip
import hashlib
import importlib.util
import json
import sys

from conftest import ROOT

from llmtrain.data.conversations import read_conversation
from llmtrain.data.sources import SPLITS, embedded_path


def read(name: str) -> list[dict]:
    return [json.loads(line) for line in gzip.open(embedded_path(name), "rt")]


def test_the_conversations_rebuild_byte_for_byte(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location("build_chat_data", ROOT / "scripts" / "build_chat_data.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--out", str(tmp_path)])
    for split in SPLITS:
        name = f"chat_{split}.jsonl.gz"
        shipped = open(embedded_path(name), "rb").read()
        assert hashlib.sha256((tmp_path / name).read_bytes()).digest() == hashlib.sha256(shipped).digest()


def test_each_split_holds_its_own_instruct_records_once_and_every_conversation_reads():
    for split in SPLITS:
        instruct = [(r["instruction"], r["output"]) for r in read(f"instruct_{split}.jsonl.gz")]
        pairs = []
        for n, record in enumerate(read(f"chat_{split}.jsonl.gz")):
            messages = [m for m in read_conversation(record, f"{split} record {n}") if m["role"] != "system"]
            assert len(messages) in (4, 6) or n == len(read(f"chat_{split}.jsonl.gz")) - 1
            for user, assistant in zip(messages[::2], messages[1::2]):
                request = user["content"].removeprefix("And ")
                pairs.append((request[0].upper() + request[1:], assistant["content"]))
        assert sorted(pairs) == sorted(instruct)  # so held-out answers are the held-out instruct answers
