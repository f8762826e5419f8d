"""dataprep/indexed.py against the readers and writers Megatron-LM itself uses, run from their own source trees
(nothing of theirs is copied here): NVIDIA/Megatron-LM's megatron/core/datasets/indexed_dataset.py and the older copy in
Shawn-IEITSystems/Yuan-1.0 (src/megatron/data/indexed_dataset.py), which Inspur's preprocess_data_cn.py writes with.

    python bench/megatron_reference_check.py --megatron PATH/Megatron-LM --yuan PATH/Yuan-1.0/src \\
        [--data DIR] [--write-test-data tests/data]

For each reference and each dtype: (1) datasets written by indexed.IndexedWriter are read by the reference: same
dtype, sequences and document index; (2) datasets written by the reference's builder are read by
dataprep/indexed.py: same sequences; written again by IndexedWriter they are byte-identical; (3) Inspur's way (one
add_item per document and no end_document) reads too. --data: a `data.py prepare --format megatron` directory, every
dataset of which the references read back id for id. --write-test-data: keep the small datasets the references
wrote, for tests/.

Running the references needs: torch and numpy (the project's .venv); `six` for Yuan's package (pip install --target
DIR six, then PYTHONPATH=DIR); Yuan's code uses np.float, gone since numpy 1.24, so this script sets np.float = float
before importing it; Megatron-LM's megatron/core/__init__ imports its whole training stack (triton, ...), so this
script loads the datasets package alone and gives it the one helper it takes from megatron/core/utils.py, a logger.
"""
import argparse
import json
import os
import sys
import tempfile
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dataprep.indexed import IndexedWriter, open_indexed, read_index  # noqa: E402


def load_megatron(root):
    for name, sub in (("megatron", "megatron"), ("megatron.core", "megatron/core")):
        m = types.ModuleType(name)
        m.__path__ = [os.path.join(root, sub)]
        sys.modules[name] = m
    utils = types.ModuleType("megatron.core.utils")
    utils.log_single_rank = lambda logger, level, *a, **k: logger.log(level, *a, **k)
    sys.modules["megatron.core.utils"] = utils
    import megatron.core.datasets.indexed_dataset as ref
    for name in [n for n in sys.modules if n == "megatron" or n.startswith("megatron.")]:
        del sys.modules[name]  # Yuan's package is also called megatron
    return ref


def load_yuan(root):
    np.float, np.double = float, float  # removed from numpy 1.24; Yuan's module refers to np.float at import
    sys.path.insert(0, root)
    from megatron.data import indexed_dataset as ref
    sys.path.remove(root)
    return ref


class Megatron:
    name = "NVIDIA/Megatron-LM core"

    def __init__(self, ref):
        self.ref = ref

    def read(self, prefix):
        ds = self.ref.IndexedDataset(prefix, mmap=True)
        return ds.index.dtype, [np.array(ds[i]) for i in range(len(ds))], np.array(ds.document_indices)

    def write(self, prefix, docs, dtype, close_documents=True):
        import torch
        b = self.ref.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        for d in docs:
            b.add_item(torch.from_numpy(np.asarray(d, dtype=np.int64)))
            if close_documents:
                b.end_document()
        b.finalize(prefix + ".idx")


class Yuan:
    name = "Yuan-1.0 (Megatron of 2021)"

    def __init__(self, ref):
        self.ref = ref

    def read(self, prefix):
        ds = self.ref.MMapIndexedDataset(prefix)
        return np.dtype(ds._index.dtype), [np.array(ds[i]) for i in range(len(ds))], np.array(ds.doc_idx)

    def write(self, prefix, docs, dtype, close_documents=True):
        import torch
        b = self.ref.MMapIndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        for d in docs:
            b.add_item(torch.IntTensor(np.asarray(d, dtype=np.int64)))  # as preprocess_data_cn.py
            if close_documents:
                b.end_document()
        b.finalize(prefix + ".idx")


def documents(seed, n, vocab):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(1, 300)) for _ in range(n)]


def ours(prefix):
    dtype, sizes, _, doc_idx = read_index(prefix)
    _, ids, _ = open_indexed(prefix)
    cuts = np.cumsum(sizes)[:-1]
    return dtype, np.split(np.array(ids), cuts) if len(sizes) else [], np.array(doc_idx)


def same(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def check(ref, tmp, keep):
    lines, ok = [], True
    for dtype, vocab in ((np.uint16, 53_248), (np.int32, 100_000), (np.int64, 100_000), (np.uint8, 200)):
        docs = documents(vocab, 500, vocab)
        # (1) ours -> reference
        p = os.path.join(tmp, f"ours_{dtype.__name__}")
        w = IndexedWriter(p, dtype)
        for d in docs:
            w.add_document(d)
        w.close()
        rd, rseq, rdoc = ref.read(p)
        one = np.dtype(rd) == np.dtype(dtype) and same(rseq, docs) and np.array_equal(rdoc, np.arange(len(docs) + 1))
        # (2) reference -> ours, and ours written again byte for byte
        q = os.path.join(tmp, f"ref_{dtype.__name__}")
        ref.write(q, docs, dtype)
        od, oseq, odoc = ours(q)
        two = np.dtype(od) == np.dtype(dtype) and same(oseq, docs) and np.array_equal(odoc, np.arange(len(docs) + 1))
        r = os.path.join(tmp, f"again_{dtype.__name__}")
        w = IndexedWriter(r, od)
        for s in oseq:
            w.add_document(s)
        w.close()
        byte = all(open(q + e, "rb").read() == open(r + e, "rb").read() for e in (".bin", ".idx"))
        # (3) documents never closed (Inspur's preprocess_data_cn.py): document index [0]
        s = os.path.join(tmp, f"inspur_{dtype.__name__}")
        ref.write(s, docs, dtype, close_documents=False)
        sd, sseq, sdoc = ours(s)
        three = same(sseq, docs) and sdoc.tolist() == [0]
        ok &= one and two and byte and three
        lines.append(f"  {np.dtype(dtype).name:>6}: {len(docs)} documents, {sum(map(len, docs)):,} ids; ours read by "
                     f"it {'ok' if one else 'DIFFERENT'}; its read by ours {'ok' if two else 'DIFFERENT'}; ours "
                     f"rewritten {'byte-identical' if byte else 'NOT byte-identical'}; unclosed documents "
                     f"{'ok' if three else 'DIFFERENT'}")
        if keep and dtype in (np.uint16, np.int32):
            tag = "megatron" if isinstance(ref, Megatron) else "yuan"
            small = documents(7, 5, 1000)
            for close in (True, False):
                name = os.path.join(keep, f"indexed_{tag}_{np.dtype(dtype).name}{'' if close else '_unclosed'}")
                ref.write(name, small, dtype, close_documents=close)
            with open(os.path.join(keep, "indexed_docs.json"), "w") as f:
                json.dump([d.tolist() for d in small], f)
    return ok, lines


def check_prepared(ref, data):
    with open(os.path.join(data, "meta.json")) as f:
        meta = json.load(f)
    n, ok = 0, True
    for shard in meta["shards"]:
        for split in ("train", "val"):
            prefix = os.path.join(data, shard[split])
            _, seq, _ = ref.read(prefix)
            mine = np.array(open_indexed(prefix)[1])
            ok &= np.array_equal(np.concatenate(seq) if seq else mine[:0], mine)
            ok &= len(mine) == shard[split + "_tokens"]
            n += len(mine)
    return ok, f"  {data}: {len(meta['shards'])} shards, {n:,} ids: {'read id for id' if ok else 'DIFFERENT'}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron", required=True, help="a Megatron-LM checkout (holding megatron/core)")
    p.add_argument("--yuan", required=True, help="Yuan-1.0's src directory (holding megatron/data)")
    p.add_argument("--data", help="a data.py prepare --format megatron directory")
    p.add_argument("--write-test-data", help="directory to keep the references' small datasets in")
    args = p.parse_args()
    refs = [Megatron(load_megatron(args.megatron)), Yuan(load_yuan(args.yuan))]
    all_ok = True
    for ref in refs:
        with tempfile.TemporaryDirectory() as tmp:
            ok, lines = check(ref, tmp, args.write_test_data)
        print(f"{ref.name}: {'PASS' if ok else 'FAIL'}")
        print("\n".join(lines))
        if args.data:
            ok2, line = check_prepared(ref, args.data)
            print(line)
            ok &= ok2
        all_ok &= ok
    sys.exit(0 if all_ok else 1)


if __name__ == "__main__":
    main()
