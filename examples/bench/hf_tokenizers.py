"""Hugging Face tokenizers (Python) on the bundled C4 sample, to compare with bench_tokenize.rs.

pip install tokenizers
RAYON_NUM_THREADS=1 python3 examples/bench/hf_tokenizers.py
RAYON_NUM_THREADS=2 python3 examples/bench/hf_tokenizers.py
"""
import gzip, json, os, sys, time
from tokenizers import Tokenizer

root = os.path.join(os.path.dirname(__file__), "..", "data")
tok = Tokenizer.from_file(sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "t5-base", "tokenizer.json"))
with gzip.open(os.path.join(root, "c4-train.00000-of-01024.first1000.json.gz"), "rt") as f:
    texts = [json.loads(line)["text"] for line in f]
best = float("inf")
for _ in range(3):
    t = time.perf_counter()
    enc = tok.encode_batch(texts, add_special_tokens=True)
    best = min(best, time.perf_counter() - t)
n = sum(len(e.ids) for e in enc)
print(f"RESULT hf-tokenizers threads={os.environ.get('RAYON_NUM_THREADS', 'all')} docs={len(texts)} tokens={n} "
      f"seconds={best:.3f} tokens_per_s={n / best:.0f}")
