"""Derive CLIP tokenizer files (vocab.json, merges.txt) from the public CLIP BPE vocabulary.

Run once: `python scripts/derive_clip_tokenizer.py bpe_simple_vocab_16e6.txt.gz OUT_DIR`.
The .gz ships inside the open_clip_torch wheel on PyPI (open_clip/bpe_simple_vocab_16e6.txt.gz);
the construction mirrors open_clip's SimpleTokenizer, so token ids match the reference tokenizer.
"""

import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def derive(bpe_gz: Path, out_dir: Path) -> None:
    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = merges[1 : 49152 - 256 - 2 + 1]  # the slice open_clip's SimpleTokenizer uses
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in pairs) + "\n")


if __name__ == "__main__":
    derive(Path(sys.argv[1]), Path(sys.argv[2]))
