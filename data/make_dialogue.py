"""Builds data/shakespeare_dialogue.jsonl: each record's prompt is one speech of Tiny
Shakespeare (speaker line included) and its reply the speech that answers it. Speeches run
from a few words to dozens of lines, so the records' lengths vary as a real fine-tuning
corpus's do: the corpus `polyburn bench train --pack` measures packing on. Run from the
repository root: python3 data/make_dialogue.py"""
import json

RECORDS = 2000

with open("data/tinyshakespeare.txt", encoding="utf-8") as f:
    speeches = [s.strip() for s in f.read().split("\n\n") if s.strip()]

with open("data/shakespeare_dialogue.jsonl", "w", encoding="utf-8") as out:
    for prompt, reply in list(zip(speeches, speeches[1:]))[:RECORDS]:
        out.write(json.dumps({"prompt": prompt + "\n\n", "reply": reply}) + "\n")
