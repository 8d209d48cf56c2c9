"""Alignment speed: ours vs TRL's GOLD byte-offset walk, share of tokenization time, preprocess workers.

Usage: ``XTOKEN_CACHE=... python benchmarks/alignment.py [--mb 1.0] [--pairs llama3:qwen3,llama3:mistral,llama3:gemma3]``

Each pair gets the full table; a summary table (one row per pair) closes the output, so a
byte-level pair and SentencePiece pairs (Mistral's dummy prefix and byte fallback, Gemma-3's
whitespace runs) are measured on the same corpus in the same run.

Corpus: generated deterministically here (seed 0), >= 1 MB of mixed documents: English-like prose
(sentences of common English words with capitals and punctuation), Python-like code, numbers
(prices, dates, decimals, large integers), CJK text (common Han characters with CJK punctuation)
and emoji (including ZWJ sequences).  It is synthetic, not real prose: documented here and in
the output.

TRL: ``trl.experimental.gold.gold_trainer`` imports accelerate/datasets (not installed in this
project's venv), so the benchmark loads TRL's own ``GOLDTrainer._align_by_byte_offsets`` source
from the installed TRL package (``pip install --no-deps --target $XTOKEN_CACHE/bench-site
trl==1.16.0``) with ``ast`` and compiles that function alone, unmodified.  If TRL is not
installed it says so and skips the comparison.  Both aligners get the same byte offsets; TRL gets
them as Python lists (as ``.tolist()`` in its trainer; the conversion is not timed).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nemo_xtoken.align import align_offsets, align_offsets_batch  # noqa: E402
from nemo_xtoken.align.core import _align_encoded, _Encoded, _profile, _side_byte_offsets  # noqa: E402
from nemo_xtoken.assets import cache_dir, tokenizer_path  # noqa: E402
from nemo_xtoken.vocab import load_tokenizer  # noqa: E402

WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have or by one had not but what all "
    "were when we there can an your which their said if do will each about how up out them then she many some so these "
    "would other into has more her two like him see time could no make than first been its who now people my made over "
    "did down only way find use may water long little very after words called just where most know get through back "
    "much before go good new write our used me man too any day same right look think also around another came come work "
    "three word must because does part even place well such here take why things help put years different away again "
    "off went old number great tell men say small every found still between name should home big give air line set own "
    "under read last never us left end along while might next sound below saw something thought both few those always "
    "looked show large often together asked house don't world going want school important until form food keep children"
).split()
CODE = [
    "def {f}(x, y=None):\n    if y is None:\n        y = {n}\n    return [v * y for v in range(x) if v % 3 == 0]\n",
    "class {F}:\n    def __init__(self, items):\n        self.items = dict(items)\n\n    def __len__(self) -> int:\n        return len(self.items)\n",
    "for i in range({n}):\n\tprint(f\"{{i:04d}}: {{i ** 2}}\")  # squares\n",
    "const {f} = async (url) => {{ const r = await fetch(url); return r.json(); }};\n",
]
CJK = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞观争究包组造落视济喜离虽坐集编宝谈府拉黑且随格尽剑讲布杀微怕母调局根曾准团段终乐切级克精哪官示冷域读"
PUNCT_CJK = "，。！？：；、"
EMOJI = ["🎉", "😀", "🚀", "👍🏽", "👩‍👩‍👧", "🇫🇷", "❤️", "🤖", "✨", "🔥"]


def make_corpus(target_bytes: int, seed: int = 0) -> list[str]:
    """Deterministic mixed documents (prose, code, numbers, CJK, emoji) totalling >= target_bytes."""
    rng = random.Random(seed)
    docs, total = [], 0

    def sentence() -> str:
        w = [rng.choice(WORDS) for _ in range(rng.randint(5, 18))]
        w[0] = w[0].capitalize()
        if rng.random() < 0.3:
            w.insert(rng.randint(1, len(w) - 1), rng.choice(["London", "NVIDIA", "Marie Curie", "Tuesday", "GPU"]))
        return " ".join(w) + rng.choice([".", ".", ".", "?", "!", ";"])

    def numbers() -> str:
        return rng.choice([
            f"In {rng.randint(1, 999)} days the price rose {rng.uniform(0, 100):.2f}% to ${rng.randint(1, 10**6):,}.",
            f"On {rng.randint(1900, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} we measured {rng.random() * 1e4:.4f} ms.",
            f"x = {rng.randint(-10**9, 10**9)}; y = {rng.random():.6e}; z = {rng.randint(0, 255):#04x}",
        ])

    def cjk() -> str:
        return "".join(rng.choice(CJK) for _ in range(rng.randint(8, 40))) + rng.choice(PUNCT_CJK)

    while total < target_bytes:
        parts = []
        for _ in range(rng.randint(4, 16)):
            r = rng.random()
            if r < 0.5:
                parts.append(sentence())
            elif r < 0.65:
                parts.append("\n" + rng.choice(CODE).format(f=rng.choice(WORDS) + "_fn", F=rng.choice(WORDS).title(), n=rng.randint(0, 99)))
            elif r < 0.8:
                parts.append(numbers())
            elif r < 0.93:
                parts.append(cjk())
            else:
                parts.append(" ".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 4))))
        doc = " ".join(parts)
        docs.append(doc)
        total += len(doc.encode("utf-8"))
    return docs


def load_trl_walk():
    """TRL's ``GOLDTrainer._align_by_byte_offsets``, compiled from the installed TRL source alone."""
    site = cache_dir() / "bench-site"
    sys.path.insert(0, str(site))
    try:
        import importlib.util

        spec = importlib.util.find_spec("trl")
        if spec is None or not spec.submodule_search_locations:
            return None, "TRL is not installed (pip install --no-deps --target $XTOKEN_CACHE/bench-site trl==1.16.0)"
        root = Path(list(spec.submodule_search_locations)[0])
        src_path = root / "experimental" / "gold" / "gold_trainer.py"
        version = "?"
        for d in site.glob("trl-*.dist-info"):
            version = d.name.removesuffix(".dist-info").split("-")[1]
        tree = ast.parse(src_path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name == "_align_by_byte_offsets":
                node.decorator_list = []
                mod = ast.Module(body=[node], type_ignores=[])
                ns: dict = {}
                exec(compile(mod, str(src_path), "exec"), ns)
                return ns["_align_by_byte_offsets"], f"TRL {version}: GOLDTrainer._align_by_byte_offsets from {src_path}"
        return None, f"{src_path} has no _align_by_byte_offsets"
    finally:
        sys.path.remove(str(site))


def clock() -> float:
    """CPU seconds of this process: single-threaded work timed robustly on a shared machine."""
    return time.process_time()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--pairs", default="llama3:qwen3,llama3:mistral,llama3:gemma3",
                    help="comma-separated student:teacher fixtures (default: a byte-level pair and two SentencePiece teachers)")
    ap.add_argument("--student", help="one pair: the student (with --teacher; overrides --pairs)")
    ap.add_argument("--teacher", help="one pair: the teacher")
    ap.add_argument("--repeat", type=int, default=3, help="best of N for the alignment timings")
    ap.add_argument("--batch", type=int, default=1000, help="documents per batched call (= preprocess shard size)")
    ap.add_argument("--skip-preprocess", action="store_true")
    ap.add_argument("--preprocess-mb", type=float, default=4.0,
                    help="corpus size for the preprocess workers comparison (larger than --mb so that work, "
                         "not worker start-up, dominates)")
    ap.add_argument("--preprocess-shard-size", type=int, default=250)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.student or args.teacher:
        pairs = [(args.student or "llama3", args.teacher or "qwen3")]
    else:
        pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    docs = make_corpus(int(args.mb * 1e6))
    nbytes = sum(len(d.encode()) for d in docs)
    print(f"corpus: {len(docs)} synthetic mixed documents, {nbytes / 1e6:.2f} MB (prose-like, code, numbers, CJK, emoji; seed 0)")
    print("timings: CPU seconds of this process (time.process_time, one core), best of --repeat; preprocess: wall clock")
    trl, note = load_trl_walk()
    print(f"TRL: {note}")
    summary = [bench_pair(args, docs, nbytes, s, t, trl) for s, t in pairs]
    keys = ["pair", "tokens s/t", "tokenize s", "kernel M tok/s", "kernel vs TRL", "batch vs TRL", "per doc vs TRL",
            "same chunks as TRL", "added to tokenizing", "align() ms/call", "preprocess 1w/2w s"]
    widths = [max(len(k), *(len(str(r.get(k, "-"))) for r in summary)) for k in keys]
    print()
    print("summary (one row per pair):")
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for r in summary:
        print("  ".join(str(r.get(k, "-")).ljust(w) for k, w in zip(keys, widths)))


def bench_pair(args, docs: list[str], nbytes: int, student: str, teacher: str, trl) -> dict:
    """The full table for one pair; returns its summary row."""
    S = load_tokenizer(str(tokenizer_path(student)))
    T = load_tokenizer(str(tokenizer_path(teacher)))
    st, tt = S.tokenizer, T.tokenizer
    _profile(S), _profile(T)  # per-tokenizer tables (token bytes, dummy-prefix probe): built once, not timed
    print()
    print(f"== tokenizers: student {student}, teacher {teacher}; one process, TOKENIZERS_PARALLELISM=false")

    # 1. tokenization of both sides (single-document encode, one core; no BOS/EOS template, as TRL gets it)
    t0 = clock()
    s_enc = [st.encode(d, add_special_tokens=False) for d in docs]
    t_s = clock() - t0
    t0 = clock()
    t_enc = [tt.encode(d, add_special_tokens=False) for d in docs]
    t_t = clock() - t0
    t_tok = t_s + t_t
    B = args.batch
    shards = [list(range(i, min(i + B, len(docs)))) for i in range(0, len(docs), B)]

    # 2. everything `align_batch` adds to tokenizing: ids to numpy, byte offsets, exactness check, alignment
    def ours_end_to_end():
        out = []
        for sh in shards:
            enc = [_Encoded([encs[i] for i in sh], None, False) for encs, info in ((s_enc, S), (t_enc, T))]
            out.append(_align_encoded(docs, sh, enc, (S, T), []))
        return out

    best_e2e = float("inf")
    for _ in range(args.repeat):
        t0 = clock()
        ours_end_to_end()
        best_e2e = min(best_e2e, clock() - t0)

    # byte offsets per document (the same offsets for every aligner below; a dummy prefix is zero width)
    def doc_offsets(info, encs):
        out = []
        for sh in shards:
            datas = [docs[i].encode() for i in sh]
            off = _side_byte_offsets(info, _Encoded([encs[i] for i in sh], None, False), [docs[i] for i in sh], datas)
            base = np.cumsum([0] + [len(x) + 1 for x in datas[:-1]])
            n = np.cumsum([0] + [len(encs[i].ids) for i in sh])
            out += [off[n[k]:n[k + 1]] - base[k] for k in range(len(sh))]
        return out

    offs = list(zip(doc_offsets(S, s_enc), doc_offsets(T, t_enc)))
    n_s = sum(len(o[0]) for o in offs)
    n_t = sum(len(o[1]) for o in offs)

    # 3. alignment alone: ours (batched per shard, and one document per call) vs TRL, same byte offsets
    def timed(fn):
        best, res = float("inf"), None
        for _ in range(args.repeat):
            t0 = clock()
            res = fn()
            best = min(best, clock() - t0)
        return best, res

    best_batch, ours_b = timed(lambda: [align_offsets_batch([offs[i][0] for i in sh], [offs[i][1] for i in sh]) for sh in shards])
    # the kernel `xtoken preprocess` runs: a shard's byte offsets already laid end to end in the
    # joined text (as `align_batch` computes them from the ids), chunk ids made local per document
    from nemo_xtoken.align.core import _localize

    kernel_in = []
    for sh in shards:
        lens = np.asarray([len(docs[i].encode()) for i in sh], dtype=np.int64)
        base = np.concatenate([[0], np.cumsum(lens)[:-1]])
        ns_ = [offs[i][0].shape[0] for i in sh]
        nt_ = [offs[i][1].shape[0] for i in sh]
        so_ = np.concatenate([offs[i][0] for i in sh]) + np.repeat(base, ns_)[:, None]
        to_ = np.concatenate([offs[i][1] for i in sh]) + np.repeat(base, nt_)[:, None]
        kernel_in.append((so_, to_, ns_, nt_, base))
    best_kernel, kern = timed(lambda: [_localize(*k) for k in kernel_in])
    same_kernel = all(
        np.array_equal(kc[0], b.student_chunk_ids) and np.array_equal(kc[1], b.teacher_chunk_ids)
        for kc, b in zip(kern, ours_b)
    )
    best_ours, ours = timed(lambda: [align_offsets(so, to) for so, to in offs])
    best_trl = None
    agree = None
    if trl is not None:
        lists = [(so.tolist(), to.tolist()) for so, to in offs]
        best_trl, trl_out = timed(lambda: [trl(so, to) for so, to in lists])
        # same chunks? (no BOS/EOS templates here; a lone dummy-prefix token is zero width: TRL may differ there)
        agree = sum(
            [list(range(a, b)) for a, b in al.student_chunks] == g_s and [list(range(a, b)) for a, b in al.teacher_chunks] == g_t
            for al, (g_s, g_t) in zip(ours, trl_out)
        )
    same = all(b[k][2] == ours[sh[k]] for b, sh in zip(ours_b, shards) for k in range(len(sh)))

    # 4. the per-document API: align() on one sentence, tokenizers passed as paths (cached after the first call)
    from nemo_xtoken.align import align

    sentence = "In 201 days, the price  rose 3.5% to $1,000:\n\tdef f(x): return x**2  # 你好 🎉"
    sp, tp = str(tokenizer_path(student)), str(tokenizer_path(teacher))
    align(sentence, sp, tp)
    per_call = []
    for _ in range(200):
        t0 = clock()
        align(sentence, sp, tp)
        per_call.append(clock() - t0)
    per_call_ms = 1e3 * float(np.median(per_call))

    rows = [
        ("documents", f"{len(docs)} (batches of {B} documents)"),
        ("student / teacher tokens", f"{n_s} / {n_t}"),
        ("chunks", f"{sum(a.n_chunks for a in ours)}"),
        ("tokenize student + teacher", f"{t_tok:.3f} s ({t_s:.3f} + {t_t:.3f})"),
        ("align_offsets_batch (ours)", f"{best_batch:.4f} s = {n_s / best_batch / 1e6:.2f} M student tokens/s (equal to per-document: {same})"),
        ("alignment kernel of a preprocess shard (offsets laid end to end)", f"{best_kernel:.4f} s = {n_s / best_kernel / 1e6:.2f} M student tokens/s (same chunk ids: {same_kernel})"),
        ("align_offsets per document", f"{best_ours:.4f} s = {n_s / best_ours / 1e6:.2f} M student tokens/s"),
    ]
    if best_trl is not None:
        rows += [
            ("TRL GOLD walk per document", f"{best_trl:.4f} s = {n_s / best_trl / 1e6:.2f} M student tokens/s"),
            ("ours vs TRL (alignment alone)", f"batched {best_trl / best_batch:.1f}x, preprocess kernel {best_trl / best_kernel:.1f}x, per document {best_trl / best_ours:.1f}x; same chunks on {agree}/{len(docs)} documents"),
        ]
    rows += [
        ("align() per call, one sentence, tokenizers as paths", f"{per_call_ms:.2f} ms (median of 200 calls)"),
        ("ours end to end beyond tokenizing", f"{best_e2e:.4f} s (to numpy, byte offsets, exactness check, alignment) = {100 * best_e2e / t_tok:.1f}% of tokenizing both sides"),
    ]

    if not args.skip_preprocess:
        from nemo_xtoken.data.preprocess import PreprocessOptions, preprocess

        with tempfile.TemporaryDirectory() as tmp:
            inp = Path(tmp) / "docs.jsonl"
            pdocs = make_corpus(int(args.preprocess_mb * 1e6), seed=1)
            pbytes = sum(len(d.encode()) for d in pdocs)
            with open(inp, "w") as f:
                for d in pdocs:
                    f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
            times = {}
            for w in (1, 2):
                opts = PreprocessOptions(str(tokenizer_path(student)), str(tokenizer_path(teacher)), shard_size=args.preprocess_shard_size)
                t0 = time.perf_counter()
                rep = preprocess(inp, Path(tmp) / f"out{w}", opts, workers=w, progress=False)
                times[w] = time.perf_counter() - t0
                assert rep["documents"] == len(pdocs), rep
            head = f"xtoken preprocess ({pbytes / 1e6:.1f} MB, shards of {args.preprocess_shard_size}), "
            rows += [
                (head + "1 worker", f"{times[1]:.2f} s ({pbytes / 1e6 / times[1]:.2f} MB/s)"),
                (head + "2 workers", f"{times[2]:.2f} s ({pbytes / 1e6 / times[2]:.2f} MB/s), speed-up {times[1] / times[2]:.2f}x"),
            ]
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    row = {
        "pair": f"{student} -> {teacher}",
        "tokens s/t": f"{n_s}/{n_t}",
        "tokenize s": f"{t_tok:.3f}",
        "kernel M tok/s": f"{n_s / best_kernel / 1e6:.1f}",
        "added to tokenizing": f"{100 * best_e2e / t_tok:.1f}%",
        "align() ms/call": f"{per_call_ms:.2f}",
    }
    if best_trl is not None:
        row.update({
            "kernel vs TRL": f"{best_trl / best_kernel:.1f}x",
            "batch vs TRL": f"{best_trl / best_batch:.1f}x",
            "per doc vs TRL": f"{best_trl / best_ours:.1f}x",
            "same chunks as TRL": f"{agree}/{len(docs)}",
        })
    if not args.skip_preprocess:
        row["preprocess 1w/2w s"] = f"{times[1]:.2f}/{times[2]:.2f}"
    return row


if __name__ == "__main__":
    main()
