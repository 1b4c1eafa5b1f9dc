"""stepneg: RL on incorrect synthetic data, per-step, in one file.

A readable reference implementation of Setlur et al., "RL on Incorrect Synthetic Data Scales the Efficiency of
LLM Math Reasoning by Eight-Fold" (NeurIPS 2024, arXiv 2406.14532). The pipeline, top to bottom:

    SFT on synthetic positives  ->  sample from the SFT model  ->  RFT (keep correct samples, fine-tune)
                                                               ->  outcome DPO (correct vs wrong, whole solutions)
                                                               ->  per-step DPO (roll out every step prefix of a
                                                                   wrong solution, find the first pit, push it down)
    ->  greedy pass@1 on the test split

    python stepneg.py --mode per_step          # the whole job on the embedded CPU default, no downloads (from a
                                               # tiny base pretrained on arithmetic, shipped in data/bigstep/base)
    python stepneg.py --mode all --seeds 3     # SFT, RFT, outcome DPO and per-step DPO side by side, on 3 seeds
    python stepneg.py --mode per_step --model Qwen/Qwen2.5-1.5B --train gsm8k_train.jsonl --test gsm8k_test.jsonl
    python stepneg.py --mode synth --teacher Qwen/Qwen2.5-7B-Instruct --train problems.jsonl   # write D_syn
    python stepneg.py --mode scaling           # the paper's headline: SFT on n..8n vs each method on n (an hour)
    torchrun --nproc_per_node 8 stepneg.py --mode per_step --model ...   # data parallel, one GPU per process
                                               # (--shard true: the model split across them, for a 7B's full FT)
    python stepneg.py --mode bench_rollouts    # after a per_step run: first-pit saving, our sampler vs generate
    python stepneg.py --mode bench_dpo         # after a per_step run: our DPO step vs a resident reference and TRL
    python stepneg.py --mode bench_shapes --train gsm8k_train.jsonl ...   # on a GPU: 1.5B- and 7B-shaped random
                                               # models through every costly stage (README: "Tests")

Read top to bottom, the file is the method: config, data, answer checking, model and tokenizer, sampling, steps and
rollouts, losses, training loops, evaluation, stages, the scaling measurement. After it, under one banner, the
machinery a reader can skip (the toys' truth, processes, files, the checker's rules, LoRA, the sampler's cache,
checkpoints, stage book-keeping, reports, the command line, benchmarks), then main.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from fractions import Fraction
from functools import lru_cache

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers.cache_utils import DynamicLayer

# ---------------------------------------------------------------------------------------------------------------
# Config: every default in one place, every field a command-line flag (--name value; parse_config, after the method).
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    # what to run, on what
    mode: str = "per_step"       # what to run (README: "Two commands"); bench_* are the benchmarks
    out: str = "out"             # every stage writes under here; a finished stage is reused on restart
    task: str = "bigstep"        # the embedded task: bigstep (a pretrained base; a teacher whose steps are too big for
                                 # it) | arith (the first toy, learned from scratch) | star (the path-star graph: one
                                 # token needs a plan) (README: "The embedded task", "The star graph")
    train: str = ""              # training problems (GSM8K, MATH or plain jsonl); D_syn = their solutions;
                                 # "" = data/TASK/train.jsonl
    test: str = ""               # test problems, same formats; "" = data/TASK/test.jsonl
    model: str = "tiny"          # "tiny" = build from a LlamaConfig offline; else a hub name or local folder
    init: str = ""               # an existing SFT checkpoint to use as pi_sft (skips the SFT stage)
    teacher: str = ""            # --mode synth: the more capable model that writes D_syn (a hub name or a folder)
    device: str = "auto"         # cuda when there is one
    seed: int = 0                # every random choice (init, shuffles, sampling) follows it
    n_train: int = 2000          # training problems used by every stage (D_syn size n); 0 = all; --task arith: 1000;
                                 # --mode scaling: 960 (8 x 960 and --val 300 fit the 8,000 shipped; arith: 500);
                                 # --task star: 7700
    n_test: int = 0              # test problems evaluated; 0 = all
    eval_k: int = 0              # > 0: also K samples per test problem at --temperature: pass@K and maj@K
    max_len: int = 256           # tokens per prompt+response; longer examples are truncated (and counted)
    # the tiny model (only when --model tiny)
    d_model: int = 96            # width; 128 (the default before) kept the ordering but took the scaling run past its
                                 # hour (data/bigstep/README.md, item 11)
    n_layers: int = 4            # transformer blocks
    n_heads: int = 4             # attention heads
    base_steps: int = 2000       # --task bigstep / star: optimizer steps pretraining the tiny model on the task's
                                 # primitives (the base, shared by every method; with the shipped settings
                                 # data/TASK/base is loaded, others train their own); star: 4000; 0 = random weights
    base_seed: int = 0           # the base's init, corpus and order: one base for every --seed, as the paper's seeds
                                 # all start from one pretrained LLM (README: "The main command")
    # SFT (and RFT, which reuses the SFT loop)
    sft_epochs: int = 16         # passes over D_syn (and, for RFT, over D_syn plus the kept samples); --mode scaling
                                 # with --val: 12 (validation picks the checkpoint; README: "The multiplier"); --task
                                 # star: 2 (more memorise the graphs: data/star/README.md)
    size_epochs: str = ""        # --mode scaling: SFT epochs per size, n first ("12,12,24,16"); empty: --sft_epochs
                                 # for every size. bigstep with --val: 12,12,24,16, each size's measured plateau
    sft_steps: int = 0           # > 0: every SFT and RFT run takes exactly this many optimizer steps, whatever its size
    val: int = 0                 # > 0: hold out the last VAL problems of --train; SFT and RFT evaluate on them 16 times
                                 # a run and keep their best checkpoint (a curve of data, not of steps); --mode
                                 # scaling on bigstep, and --task star: 300
    lr: float = 3e-3             # tiny model from scratch; use ~1e-5 for a pretrained 7B
    batch_size: int = 32         # examples (or pairs) per optimizer step, in every training loop
    micro_batch: int = 0         # > 0: run each batch in pieces this big, accumulating gradients (same update)
    # sampling from pi_sft (RFT positives, negatives, rollouts)
    k_samples: int = 4           # samples per training problem
    temperature: float = 0.7     # paper: 0.7-1.0; 0.7 gave fewer noise negatives here
    max_new_tokens: int = 64     # longest generated solution or continuation, in tokens
    gen_batch: int = 256         # rows per generate call, at most
    gen_tokens: int = 0          # > 0: a batch also ends before rows x (longest prompt + max_new_tokens) passes this
                                 # KV-cache budget; 0 = none on CPU, half the free GPU memory on CUDA
    # RFT
    rft_cap: int = 4             # distinct correct samples kept per problem (paper: 4-8)
    rft_from_sft: bool = False   # default: start RFT from the same initial model as SFT (equal-problem comparison)
    # per-step credit
    rollouts: int = 8            # M (the paper's Best-of-K uses K = 5). A step right 30% of the time looks dead with
                                 # probability 0.7^M: 24% at M = 4 (false pits), 6% at M = 8
    max_negatives: int = 4       # distinct wrong samples kept per problem (paper: up to 8; here all of k = 4 samples)
    step_cap: int = 12           # at most this many steps per solution (extra lines merge into the last)
    credit: str = "first_pit"    # first_pit: the first step whose prefix no rollout finishes (paper) | min_advantage:
                                 # the step whose value drops most
    value: str = "mean"          # a prefix's value for min_advantage and AWR: mean (Q-hat, the fraction of rollouts
                                 # that succeed) | bok (the paper's Best-of-K policy: the chance that the best of
                                 # --bok_k rollouts succeeds, bok_value); first_pit is the same under both
    bok_k: int = 5               # K of --value bok (the paper: 5)
    pair_form: str = "step"      # step: rejected = the pit step alone | full: (x, y+, y-_{1:c}) shorthand
    loss: str = "dpo"            # per-step stage: dpo (paper) | awr (advantage-weighted steps, the paper's RL view)
                                 # | both (per_step and per_step_awr side by side, on the same rollouts)
    beta_awr: float = 0.5        # AWR temperature: step weights exp(A / beta_awr), normalised over the batch
    slips: float = 0.0           # --task bigstep: the share of D_syn solutions that reach the right answer through two
                                 # slips that cancel (with_slips: the variant where positives carry spurious steps)
    audit: int = 0               # > 0: look for spurious steps in this many of pi_sft's correct samples (run_audit:
                                 # rollouts from every prefix; a step flagged when its advantage is below -0.5)
    # DPO (outcome and per-step)
    beta: float = 0.1            # DPO's beta: how far from pi_ref the policy may move for a given margin
    lora_rank: int = 0           # > 0: train low-rank adapters (Hu et al. 2021) instead of every weight; saved merged
    grad_ckpt: bool = False      # recompute activations in the backward pass: less memory, about 30% more time
    shard: bool = False          # under torchrun: split weights, gradients and optimizer state across the processes
                                 # (FSDP2, per decoder layer) instead of a whole copy in each (DDP); README "Real models"
    branch: bool = True          # DPO: read a pair's shared prompt once, run chosen and rejected from its KV cache
    sort_len: bool = False       # batch training examples of similar length together: less padding (real data's
                                 # lengths vary 10x). Off on the toys: on bigstep no faster, and SFT scored worse
    dpo_lr: float = 5e-5         # learning rate of outcome DPO, per-step DPO and AWR
    dpo_epochs: int = 2          # passes over the pairs (or AWR's weighted steps)
    log_every: int = 20          # training steps between log lines
    ckpt_every: int = 100        # training steps between resumable checkpoints (model, optimizer, data position)
    # --mode scaling: SFT on n, 2n, ..., 2^doublings n problems; every method on n; seeds seed .. seed+seeds-1
    doublings: int = 3           # SFT sizes n .. 2^doublings n
    seeds: int = 1               # run every seed from --seed to --seed + seeds - 1, each a full repeat from one base, in
                                 # OUT/seed<S>/, and print one table over them (seeds.md); --mode scaling: 3


PROMPT = "Question: {question}\nAnswer:\n"


# ---------------------------------------------------------------------------------------------------------------
# Data: the embedded toy task, and readers for GSM8K, MATH and a plain format.
# ---------------------------------------------------------------------------------------------------------------

NAMES = ["Ava", "Ben", "Cal", "Dan", "Eve", "Fay", "Gus", "Ivy", "Jon", "Kim", "Leo", "Mia", "Ned", "Pam", "Sam",
         "Tom", "Uma", "Zoe"]
ITEMS = ["apples", "pens", "cards", "books", "coins", "eggs", "shells", "stamps", "marbles", "cookies"]


def make_chain(rng):
    """The bigstep task's operations: start 5-40, 3-4 of +2..40, -2..40 (only above 20, leaving at least 10), x2 / x3
    (up to 60), /2 / /3 (when it divides). Wide enough that no answer is guessable. -> (start, [(op, n)], answer)"""
    value = start = rng.randint(5, 40)
    ops = []
    for _ in range(rng.randint(3, 4)):
        op = rng.choice(["+", "+"] + ["-", "-"] * (value > 20) + ["*"] * (value <= 60)
                        + ["/"] * (value % 2 == 0 or value % 3 == 0))
        if op == "+":
            n = rng.randint(2, 40)
        elif op == "-":
            n = rng.randint(2, min(40, value - 10))
        else:
            n = rng.choice([d for d in (2, 3) if op == "*" or value % d == 0])
        value = apply_op(value, op, n)
        ops.append((op, n))
    return start, ops, value


def apply_op(value, op, n):
    return {"+": value + n, "-": value - n, "*": value * n, "/": value // n}[op]


def chain_text(start, ops, rng=None, merge=0.0):
    """The solution, one operation a line; with probability `merge`, a run of two or three +/- operations is written
    as one line ("32 - 13 + 31 = 50"): the bigstep teacher's steps, bigger than the learner can take."""
    value, lines, i = start, [], 0
    while i < len(ops):
        run = 0  # the +/- operations from here on, up to three
        while run < 3 and i + run < len(ops) and ops[i + run][0] in "+-":
            run += 1
        k = run if run >= 2 and rng and rng.random() < merge else 1
        new = value
        for op, n in ops[i:i + k]:
            new = apply_op(new, op, n)
        lines.append(f"{value} " + " ".join(f"{op} {n}" for op, n in ops[i:i + k]) + f" = {new}")
        value, i = new, i + k
    return "\n".join(lines + [f"The answer is {value}"])


def make_bigstep_problem(rng):
    """The default task: a word problem whose D_syn solution comes from a teacher that writes three in four of its runs
    of +/- operations (up to three) as one line.
    -> {"question": "Kim has 35 eggs. Kim sells 12. Kim gets 32 more. Kim buys 33 more. Kim gives away 4. How many
        eggs now?", "answer": "84", "response": "35 - 12 = 23\\n23 + 32 + 33 - 4 = 84\\nThe answer is 84"}"""
    start, ops, value = make_chain(rng)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    sentences = [f"{name} has {start} {item}."] + [f"{name} {op_phrase(rng, op, n)}." for op, n in ops]
    return {"question": " ".join(sentences + [f"How many {item} now?"]), "answer": str(value),
            "response": chain_text(start, ops, rng, merge=0.75)}


def op_phrase(rng, op, n):
    """One operation in the task's words: ("+", 31) -> "gets 31 more", ("-", 13) -> "gives away 13", ("*", 2) ->
    "doubles them", ("/", 3) -> "keeps a third of them"."""
    if op == "+":
        return f"{rng.choice(['buys', 'finds', 'gets'])} {n} more"
    if op == "-":
        return f"{rng.choice(['gives away', 'loses', 'sells'])} {n}"
    return f"{['doubles', 'triples'][n - 2]} them" if op == "*" else f"keeps {['half', 'a third'][n - 2]} of them"


def base_corpus(seed, n):
    """What the bigstep learner is pretrained on: lists of the task's operations, half of the lists written in symbols
    and half in the task's phrases, solved one operation a line, chained, ending in the answer line -- the primitive
    skills (the arithmetic, and what each phrase asks for), never a word problem: nobody has anything, nothing is asked.
    -> [{"question": "Compute 32, - 13, + 31, * 2." or "Compute 32, loses 13, finds 31 more, doubles them.",
         "response": "32 - 13 = 19\n19 + 31 = 50\n50 * 2 = 100\nThe answer is 100"}]"""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        start, ops, _ = make_chain(rng)
        words = [op_phrase(rng, op, k) for op, k in ops] if rng.random() < 0.5 else [f"{op} {k}" for op, k in ops]
        rows.append({"question": f"Compute {start}, " + ", ".join(words) + ".", "response": chain_text(start, ops)})
    return rows


def with_slips(problems, share, seed=0):
    """--slips P (the other side of the spurious-step claim): a share P of the D_syn solutions, chosen by seed, come
    from a sloppy teacher that reaches the right answer through two slips that cancel -- one line's result off by
    d = 1..3, the next line computed from the wrong value and off by -d, back on the true chain:
    "35 - 12 = 23\n23 + 32 = 55\n..." -> "35 - 12 = 24\n24 + 32 = 55\n..." (first_wrong_step: 1). Solutions with
    one arithmetic line are left as they are."""
    rng, out = random.Random(seed), []
    for p in problems:
        lines = (p["response"] or "").split("\n")
        pick, d = rng.random() < share, rng.choice([-3, -2, -1, 1, 2, 3])
        if pick and len(lines) >= 3 and all(TOY_STEP.fullmatch(line) for line in lines[:2]):
            a, b = TOY_STEP.fullmatch(lines[0]), TOY_STEP.fullmatch(lines[1])
            wrong = int(a[3]) + d
            lines[:2] = [f"{a[1]}{a[2]} = {wrong}", f"{wrong}{b[2]} = {b[3]}"]
            p = {**p, "response": "\n".join(lines)}
        out.append(p)
    return out


def make_toy_data(task="bigstep", seed=0, n_train=8000, n_test=500):
    """The shipped data/TASK/ files: distinct questions, test disjoint from train. Same seed, same bytes."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < n_train + n_test:
        p = {"bigstep": make_bigstep_problem, "arith": make_problem, "star": make_star_problem}[task](rng)
        if p["question"] not in seen:
            seen.add(p["question"])
            rows.append(p)
    return rows[:n_train], rows[n_train:]


def load_problems(path, limit=0):
    """Read GSM8K, MATH or plain jsonl into {"question", "gold", "response"} (response = D_syn, may be None).
    GSM8K {"question", "answer": "...<<48/2=24>>24 ... #### 72"} -> gold "72", response with "The answer is 72"
    MATH  {"problem", "solution": "... \\boxed{\\frac12}", "answer"?}  -> gold "\\frac12", response = solution
    plain {"question", "answer": "72", "response"?}"""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file (give --train/--test, or run --mode make_data)")
    problems = []
    for n, row in numbered_jsonl(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(row).__name__}")
        fmt = "math" if "problem" in row else "gsm8k" if "####" in str(row.get("answer", "")) else "plain"
        need = {"math": ["problem", "solution"], "gsm8k": ["question", "answer"], "plain": ["question", "answer"]}
        for field in need[fmt]:
            if not isinstance(row.get(field), str) or not row[field].strip():
                raise ValueError(f"{path}, line {n}: field {field!r} is missing or not a non-empty string "
                                 f"(read as {fmt} format)")
        if fmt == "math":
            gold = row["answer"] if isinstance(row.get("answer"), str) else extract_answer(row["solution"])
            if gold is None:
                raise ValueError(f"{path}, line {n}: field 'solution' has no \\boxed{{}} answer and no 'answer' field")
            problems.append({"question": row["problem"], "gold": gold, "response": row["solution"]})
        elif fmt == "gsm8k":
            body, gold = row["answer"].rsplit("####", 1)
            response = re.sub(r"<<[^>]*>>", "", body).rstrip() + f"\nThe answer is {gold.strip()}"
            problems.append({"question": row["question"], "gold": gold.strip(), "response": response})
        else:
            response = row.get("response")
            if response is not None and not isinstance(response, str):
                raise ValueError(f"{path}, line {n}: field 'response' must be a string")
            problems.append({"question": row["question"], "gold": row["answer"].strip(), "response": response})
        if limit and len(problems) == limit:
            break
    if not problems:
        raise ValueError(f"{path}: no problems (empty file)")
    return problems


# ---------------------------------------------------------------------------------------------------------------
# Answer checking: r(x, y) decides every label, so it never crashes, never evals model text, and is time-bounded.
# ---------------------------------------------------------------------------------------------------------------


def extract_answer(text):
    """The final answer of a solution, or None.
    "...\\nThe answer is 18."  -> "18"      "... #### 1,000" -> "1,000"      "so $\\boxed{\\frac{1}{2}}$." -> "\\frac{1}{2}"
    Whichever marker comes last in the text wins."""
    if not isinstance(text, str):
        return None
    found = []  # (position, answer)
    for m in re.finditer(r"[Tt]he (?:final )?answer is[:\s]*([^\n]*?)(?=[Tt]he (?:final )?answer is|\n|$)", text):
        found.append((m.start(), m.group(1)))
    for m in re.finditer(r"####\s*([^\n]*)", text):
        found.append((m.start(), m.group(1)))
    box = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if box >= 0:
        rest = text[box + (6 if text.startswith("\\boxed", box) else 5):].lstrip()
        inner = _braced(rest, 0) if rest.startswith("{") else re.match(r"[^\s$]*", rest).group(0)
        if inner is not None:
            found.append((box, inner))
    if not found:
        return None
    answer = max(found, key=lambda pa: pa[0])[1]
    if "\\boxed" in answer or "\\fbox" in answer:  # "The answer is $\boxed{5}$"
        answer = extract_answer(answer) or answer
    answer = re.sub(r"\.$", "", answer.strip().strip("$").strip()).strip().strip("$").strip()  # "$35$." -> "35"
    return answer or None


@lru_cache(maxsize=100_000)
def is_equiv(pred, gold):
    """Mathematical equality of two final answers. "1,000" == "1000"; "\\frac{1}{2}" == "0.5"; "(1, 2)" != "[1, 2]";
    "x = 3" == "3"; "2, 1" == "1, 2" (a list of roots), but "5 > 2 > 1" != "5 > 1 > 2" (a path, --task star);
    "0.333" != "\\frac13"; "50\\%" == "50" == "0.5" only by percent. None is never equal. Never raises: a malformed
    answer is just not equal."""
    if pred is None or gold is None:
        return False
    try:
        pred, gold = str(pred)[:10_000], str(gold)[:10_000]
        if _PATH.fullmatch(gold):  # a path (--task star): the same nodes in the same order
            return bool(_PATH.fullmatch(pred)) and re.findall(r"\d+", pred) == re.findall(r"\d+", gold)
        a, b = _normalize(pred.replace("\\%", "").replace("%", "")), _normalize(gold.replace("\\%", "").replace("%", ""))
        if not a or not b:
            return False
        if a == b or _equal_relation(a, b):
            return True
        ia, ib = _as_interval(a), _as_interval(b)
        if (ia or ib) and _equal_structured(ia or a, ib or b):
            return True
        xs, ys = _listed(a, b)
        if _equal_structured(", ".join(xs), ", ".join(ys)):
            return True
        # "50%" against "0.5": a percent on exactly one side may also be read as a fraction
        if ("%" in pred) != ("%" in gold) and _NUMBER.fullmatch(a) and _NUMBER.fullmatch(b):
            x, y = (Fraction(a) / 100, Fraction(b)) if "%" in pred else (Fraction(a), Fraction(b) / 100)
            return x == y
        return False
    except Exception:
        return False


_PATH = re.compile(r"\s*\d+(\s*>\s*\d+){2,}\s*")  # 5 > 12 > 40: three or more labels (a relation has two)


def reward(response, gold):
    """r(x, y) in {0, 1}."""
    return int(is_equiv(extract_answer(response), gold))


# ---------------------------------------------------------------------------------------------------------------
# Model and tokenizer.
# ---------------------------------------------------------------------------------------------------------------


TOY_WORDS = NAMES + ITEMS + ("has buys finds gets more. gives away loses sells doubles triples quadruples them. keeps "
                             "half a third quarter of How many now? The answer is").split()


def tiny_tokenizer(task="bigstep"):
    """A tokenizer built offline for the toy: byte-level BPE whose only merges spell the toy's fixed words (names,
    items, verbs, " + ", " = ", "Question:", ...) as single tokens; digits stay one per token (a tiny model adds better
    digit by digit); anything else falls back to bytes. Plus <pad>, <s>, </s>. A toy example is 52 tokens, 149 bytes.
    --task star adds its words and each node label with its arrow ("12 > ") or without ("12") as one token: an edge is
    two tokens, so looking one up is the plainest copy a transformer learns (find this token, copy the next)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + alphabet)}
    merges = []
    words = ["Ġ" + w for w in TOY_WORDS] + ["Ġ" + op + "Ġ" for op in "+-*/="] + ["Question:", "Answer:", "The"]
    if task == "star":
        labels = range(1, STAR["labels"] + 1)
        words += ["ĠEdges:", "ĠPath", "Ġfrom", "Ġto", "ĠFollow", ",Ġ"] + [str(v) for v in labels] + [f"{v}Ġ>Ġ" for v in labels]
    for word in words:
        for i in range(1, len(word)):
            if word[:i + 1] not in vocab:
                vocab[word[:i + 1]] = len(vocab)
                merges.append((word[:i], word[i]))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def load_model(cfg, path):
    """(model, tokenizer). path "tiny" builds a fresh LlamaConfig model; anything else goes to from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    device = pick_device(cfg)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 weights on GPU; losses use fp32 log-softmax
    if device == "cuda":  # cuDNN attention plans each new sequence length anew, and decoding makes one every step:
        torch.backends.cuda.enable_cudnn_sdp(False)  # 64 rows x 64 tokens, 1.5B shape, H200: 4.7 s with it, 1.7 without
    if path == "tiny":
        tok = tiny_tokenizer(cfg.task)
        torch.manual_seed(cfg.seed)
        mc = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.d_model, intermediate_size=3 * cfg.d_model,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.max_len + cfg.max_new_tokens,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
        model = LlamaForCausalLM(mc)
    else:
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
        except Exception as e:
            if not os.path.isdir(path):
                raise
            e = f"{type(e).__name__}: " + next((line for line in str(e).splitlines() if line.strip()), "")[:200]
            raise SystemExit(f"error: {path}: not a loadable model folder ({e})" + hint_rebuild(path)) from None
        if info["missing_keys"]:  # transformers would start these from random weights, with only a warning
            raise SystemExit(f"error: {path}: its weights lack {len(info['missing_keys'])} of the model's tensors "
                             f"({sorted(info['missing_keys'])[0]}, ...)" + hint_rebuild(path))
    if tok.pad_token is None:  # many base models ship without one; padding is always masked, so EOS serves
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise ValueError(f"{path}: the tokenizer has no EOS token; stepneg needs one to end complete solutions")
    if cfg.shard:
        decoder_layers(model)  # the unit --shard splits by: said at the first load, not at the first training step
    return model.to(device=device, dtype=dtype), tok


def encode(tok, prompt, response, complete):
    """The one place that decides token boundaries. Prompt and response are tokenised separately and concatenated,
    so a BPE merge can never straddle the boundary and the loss mask is exactly the response's tokens (which are
    what the model produced, or would produce, after this prompt). EOS ends complete solutions only: a rejected
    partial step must not teach "stop here".
    ("Question: 2+2?\\nAnswer:\\n", "2 + 2 = 4\\nThe answer is 4", True) -> (prompt_ids, response_ids + [eos])"""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    if p and p[-1] == tok.eos_token_id:  # some tokenizers append EOS to every encode
        p = p[:-1]
    r = tok(response, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if complete else [])
    assert len(p) > 0 and (len(r) > 0 or not response), "encode: empty prompt, or a response with no tokens"
    return p, r


def batch_tensors(tok, examples, max_len, device):
    """examples: [(prompt_ids, response_ids)] -> ids (B, T), attention (B, T), loss mask (B, T), right-padded.
    Over-long examples lose the tail of their response (counted by the caller via the returned number)."""
    rows, truncated = [], 0
    for p, r in examples:
        ids, mask = p + r, [0] * len(p) + [1] * len(r)
        if len(ids) > max_len:
            ids, mask, truncated = ids[:max_len], mask[:max_len], truncated + 1
        rows.append((ids, mask))
    T = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id
    ids = torch.tensor([i + [pad] * (T - len(i)) for i, _ in rows], device=device)
    att = torch.tensor([[1] * len(i) + [0] * (T - len(i)) for i, _ in rows], device=device)
    mask = torch.tensor([m + [0] * (T - len(m)) for _, m in rows], device=device, dtype=torch.float32)
    return ids, att, mask, truncated


def sequence_logps(model, ids, att, mask):
    """Sum of log pi(response token | everything before it), per row: (B,). Log-softmax in fp32 even under bf16."""
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()     # (B, T-1, V)
    logp = torch.log_softmax(logits, dim=-1)                                       # (B, T-1, V)
    tok_logp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)               # (B, T-1)
    return (tok_logp * mask[:, 1:]).sum(-1)                                        # (B,)


# ---------------------------------------------------------------------------------------------------------------
# Sampling: our own batched, left-padded, KV-cached decode loop, seeded per batch.
# ---------------------------------------------------------------------------------------------------------------

# A finished line holding one of these ends a solution: the final answer is written, what follows is not read
# (extract_answer would take a later marker; learners fine-tuned on D_syn stop after their answer line anyway).
ANSWER_LINE = re.compile(r"The answer is|####|\\boxed\{")


@torch.no_grad()
def generate(model, tok, prompts, temperature, max_new_tokens, seed):
    """One batch of rows -> (completions, tokens generated per row, prompt tokens read). temperature 0 = greedy.
    ["Question: ...\\nAnswer:\\n", ...] -> ["7 + 5 = 12\\n...The answer is 9", ...]
    Not transformers' generate: here a row that is done (EOS, or a finished answer line) leaves the batch and the KV
    cache, so a batch's tail costs only its live rows. The random draws are generate's (seeded the same way, one
    multinomial over all B rows per step), so the two write the same text for the same seed (tested), up to the float
    rounding of a prefill over distinct prompts only (2 of 512 rows differed in a check at T = 1)."""
    model.eval()
    distinct = {p: u for u, p in enumerate(dict.fromkeys(prompts))}  # k samples, M rollouts: the same prompt k times
    enc = [tok(p, add_special_tokens=True)["input_ids"] for p in distinct]
    B = len(prompts)
    device, pad, eos, newline = next(model.parameters()).device, tok.pad_token_id, tok.eos_token_id, newline_ids(tok)
    ids, att = left_pad(enc, pad, device)                                                          # (U, T)
    torch.manual_seed(seed)
    out = model(input_ids=ids, attention_mask=att, position_ids=(att.cumsum(-1) - 1).masked_fill(att == 0, 1),
                use_cache=True, logits_to_keep=1)
    # each distinct prompt is read once; its KV cache is then copied out to every row that samples from it
    index = torch.tensor([distinct[p] for p in prompts], device=device)
    cache, att = roomy(out.past_key_values, index, max_new_tokens), att[index]                    # (B, T)
    logits = out.logits[index, -1].float()                                                          # (B, V)
    live = list(range(B))                 # the batch row of each row still in the cache
    new, answered, done = [[] for _ in range(B)], set(), set()
    for t in range(max_new_tokens):
        if temperature > 0:  # a draw over all B rows: each row's random numbers do not depend on who has finished
            probs = torch.zeros(B, logits.shape[-1], device=device)                                # (B, V)
            probs[:, pad] = 1.0
            probs[live] = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1).squeeze(1)[live]                                     # (b,)
        else:
            nxt = logits.argmax(-1)                                                                # (b,)
        for j, token in enumerate(nxt.tolist()):
            if live[j] in done:
                continue
            row = new[live[j]]
            row.append(token)
            if token == eos:
                done.add(live[j])
            elif token in newline and ANSWER_LINE.search(tok.decode(row).rsplit("\n", 1)[0]):
                done.add(live[j])
                answered.add(live[j])
        keep = [j for j, row in enumerate(live) if row not in done]
        if not keep or t == max_new_tokens - 1:
            break
        if len(live) - len(keep) >= max(1, len(live) // 8):  # drop finished rows from the cache, a few at a time
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            live, att, nxt = [live[j] for j in keep], att[index], nxt[index]
        position = att.sum(-1, keepdim=True)                                                        # (b, 1)
        att = torch.cat([att, torch.ones_like(att[:, :1])], dim=1)                                  # (b, T + t + 1)
        out = model(input_ids=nxt[:, None], attention_mask=att, position_ids=position, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, out.logits[:, -1].float()                             # (b, V)
    texts = [tok.decode(row, skip_special_tokens=True) for row in new]
    texts = [t.rsplit("\n", 1)[0] if i in answered else t for i, t in enumerate(texts)]
    return texts, [len(r) for r in new], sum(len(e) for e in enc)


# ---------------------------------------------------------------------------------------------------------------
# Steps and rollouts: per-step credit by Monte-Carlo rollouts, the first pit, the per-step pairs.
# ---------------------------------------------------------------------------------------------------------------


def split_steps(text, cap=12, min_words=3, max_chars=400):
    """A solution as steps: one per line, a line over max_chars split after its sentences (MATH solutions are often
    one long paragraph); a piece of fewer than min_words words ("So", "First,", a blank line) joins the next, so no
    step is tiny, and pieces past the cap merge into the last step. "".join(steps) == text, always.
    "7 + 5 = 12\\n12 - 3 = 9\\nThe answer is 9" -> ["7 + 5 = 12\\n", "12 - 3 = 9\\n", "The answer is 9"]"""
    pieces = []
    for line in text.splitlines(keepends=True):
        pieces += re.split(r"(?<=[.!?] )(?=[A-Z$\\])", line) if len(line) > max_chars else [line]
    pieces = [p for p in pieces if p]
    steps = []
    for piece in pieces:
        if steps and (len(steps[-1].split()) < min_words or len(steps) >= cap):
            steps[-1] += piece
        else:
            steps.append(piece)
    return steps or [text]


def collect_negatives(problems, samples, cap, right=0):
    """Distinct wrong samples per problem (right=1: distinct correct ones): [{"pid", "nid", "response", "right"}]."""
    negs = []
    for pid, (prob, s) in enumerate(zip(problems, samples)):
        seen = set()
        for text, ok in zip(s["responses"], s["correct"]):
            if ok == right and text not in seen and len(seen) < cap:
                seen.add(text)
                negs.append({"pid": pid, "nid": len(negs), "response": text, "right": right})
    return negs


def step_values(model, tok, problems, samples, negatives, cfg, out_dir):
    """Q-hat of every step prefix of every negative, one convention for both returns: index i is the prefix
    x + y_{1:i}, 1-based like the paper's y_1 ... y_L, and i = 0 is x alone (valued by the k samples already drawn
    there). Prefixes are explored round by round (i = 1, 2, ...), each round sending all live prefixes of all
    negatives to the model as big batches of prefixes x M rows: Q_i = the fraction of the M rollouts from
    x + y_{1:i} whose final answer is correct; Q_L = r(x, y) (0 for a negative) needs none. With credit=first_pit a
    negative leaves the search once a prefix has Q = 0 (its pit is found).
    -> {nid: [Q_0, Q_1, ..., Q_L] (None where not explored)}, {nid: {i: [correct continuations of x + y_{1:i}]}},
       accounting"""
    M, Q, wins, spent, tokens, new_tokens, seconds = cfg.rollouts, {}, {}, 0, 0, 0, 0.0
    for n in negatives:
        s = samples[n["pid"]]
        n["steps"] = split_steps(n["response"], cfg.step_cap)
        Q[n["nid"]] = [sum(s["correct"]) / len(s["correct"])] + [None] * (len(n["steps"]) - 1) + [n.get("right", 0.0)]
        wins[n["nid"]] = {0: [t for t, ok in zip(s["responses"], s["correct"]) if ok]}
    live = [n for n in negatives if len(n["steps"]) > 1]
    max_L = max((len(n["steps"]) for n in negatives), default=0)
    for i in range(1, max_L):
        live = [n for n in live if i < len(n["steps"])]
        if not live:
            break
        rows = []
        for n in live:
            prefix = "".join(n["steps"][:i])
            rows += [(f"{n['nid']}/{i}/{j}", PROMPT.format(question=problems[n["pid"]]["question"]) + prefix)
                     for j in range(M)]
        texts, st = cached_generate(model, tok, rows, cfg, f"{out_dir}/rollouts.jsonl",
                                    cfg.seed + 7919 * i, f"rollouts, prefix length {i}")
        spent, tokens = spent + len(rows), tokens + st["tokens"]
        new_tokens, seconds = new_tokens + st["new_tokens"], seconds + st["seconds"]
        for n in live:
            prefix = "".join(n["steps"][:i])
            conts = [texts[f"{n['nid']}/{i}/{j}"] for j in range(M)]
            wins[n["nid"]][i] = [c for c in conts if reward(prefix + c, problems[n["pid"]]["gold"])]
            Q[n["nid"]][i] = len(wins[n["nid"]][i]) / M
        if cfg.credit == "first_pit":
            live = [n for n in live if Q[n["nid"]][i] > 0]
    return Q, wins, {"rollouts": spent, "rollout_tokens": tokens, "rollout_s": round(seconds, 1),
                     "rollout_tokens_per_s": round(new_tokens / seconds) if new_tokens else None}


def find_pit(values, rule):
    """The critical step c (1-based) of a negative from its values [Q_0, Q_1, ..., Q_L], or None (no pair).
    first_pit:      the first i with Q_i = 0, needing Q_{i-1} > 0.   [.5, 1, .25, 0, 0] -> 3
    min_advantage:  argmin_i A_i, A_i = Q_i - Q_{i-1}, if negative.  [.5, 1, .25, 0, 0] -> 2 (A = -.75)"""
    if rule == "first_pit":
        for i in range(1, len(values)):
            if values[i] == 0:
                return i if values[i - 1] > 0 else None
        return None
    adv = {i: values[i] - values[i - 1] for i in range(1, len(values))}
    c = min(adv, key=adv.get)
    return c if adv[c] < 0 else None


def bok_value(q, n, K):
    """The value of a prefix under the paper's rollout policy, Best-of-K of pi_sft: P(at least one of K rollouts
    succeeds), from c = q * n successes in n rollouts. n >= K: the unbiased estimate 1 - C(n - c, K) / C(n, K)
    (pass_at_k); n < K (the k samples at x): the plug-in 1 - (1 - q)^K.   n = 8, c = 1, K = 5 -> 5/8; c = 4 -> 1"""
    if q is None:
        return None
    return pass_at_k(n, round(q * n), K) if n >= K else 1.0 - (1.0 - q) ** K


def credit_values(Q, cfg):
    """The values credit reads: Q-hat itself (--value mean), or Best-of-K values (--value bok). Index 0 came from
    the k samples at x, the rest from M rollouts each; the last (the negative's own answer, wrong) is 0 either way."""
    if cfg.value == "mean":
        return Q
    return {nid: [bok_value(q, cfg.k_samples if i == 0 else cfg.rollouts, cfg.bok_k) for i, q in enumerate(values)]
            for nid, values in Q.items()}


def per_step_pairs(problems, negatives, Q, wins, cfg):
    """The per-step DPO pairs, in the shared-prefix form Self-Explore ships. For a pit at step c of negative y-:
      step form: prompt = x + y-_{1:c-1}, chosen = the shortest correct continuation of that prompt (a rollout, or
                 at c = 1 a correct sample) (+EOS), rejected = y-_c alone (no EOS: it is a partial solution)
      full form: prompt = x, chosen = the shortest correct sample, rejected = y-_{1:c} (no EOS)
    {"prompt": "Question: ...\nAnswer:\n7 + 5 = 12\n", "chosen": "12 - 3 = 9\nThe answer is 9",
     "rejected": "12 - 3 = 8\n", ...}"""
    pairs, V = [], credit_values(Q, cfg)
    for n in negatives:
        c = find_pit(V[n["nid"]], cfg.credit)
        options = sorted(wins[n["nid"]].get(0 if cfg.pair_form == "full" else c - 1, []), key=len) if c else []
        if not options:
            continue
        x = PROMPT.format(question=problems[n["pid"]]["question"])
        if cfg.pair_form == "full":
            prompt, rejected = x, "".join(n["steps"][:c])
        else:
            prompt, rejected = x + "".join(n["steps"][:c - 1]), n["steps"][c - 1]
        pairs.append({"prompt": prompt, "chosen": options[0], "rejected": rejected, "rejected_complete": False,
                      "pid": n["pid"], "nid": n["nid"], "pit": c, "n_steps": len(n["steps"]), "q": Q[n["nid"]]})
    return pairs


def awr_examples(problems, negatives, Q, wins, cfg):
    """The same rollouts as per-step DPO, read as advantage-weighted steps (--loss awr): every step of a negative
    whose prefix values are both known, A_i = Q_i - Q_{i-1}, and each pair's chosen continuation, A = 1 - Q_{c-1}
    (it reached the answer from a prefix worth Q_{c-1}); Q the values of --value (credit_values).   Q = [1/2, 1, 0]:
    {"prompt": x, "response": y_1, "advantage": 0.5}, {"prompt": x + y_1, "response": y_2, "advantage": -1.0},
    {"prompt": x + y_1, "response": the chosen continuation, "complete": True, "advantage": 0.0}"""
    examples, V = [], credit_values(Q, cfg)
    for n in negatives:
        values = V[n["nid"]]
        x = PROMPT.format(question=problems[n["pid"]]["question"])
        for i in range(1, len(values)):
            if values[i] is not None and values[i - 1] is not None:
                examples.append({"prompt": x + "".join(n["steps"][:i - 1]), "response": n["steps"][i - 1],
                                 "complete": i == len(n["steps"]), "advantage": values[i] - values[i - 1],
                                 "nid": n["nid"], "step": i})
    for p in per_step_pairs(problems, negatives, Q, wins, dataclasses.replace(cfg, pair_form="step")):
        examples.append({"prompt": p["prompt"], "response": p["chosen"], "complete": True,
                         "advantage": 1.0 - V[p["nid"]][p["pit"] - 1], "nid": p["nid"], "step": p["pit"]})
    return examples


def word_edit_distance(a, b):
    """Levenshtein distance over whitespace-separated words."""
    a, b = a.split(), b.split()
    prev = list(range(len(b) + 1))
    for i, wa in enumerate(a, 1):
        cur = [i]
        for j, wb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wa != wb)))
        prev = cur
    return prev[-1]


def outcome_pairs(problems, samples, cap):
    """Outcome-DPO pairs: each distinct correct sample (up to cap) against the wrong sample of the same problem
    farthest from it by edit distance (the stronger of the paper's outcome baselines). Both sides complete."""
    pairs = []
    for pid, s in enumerate(samples):
        pos = list(dict.fromkeys(t for t, ok in zip(s["responses"], s["correct"]) if ok))[:cap]
        neg = list(dict.fromkeys(t for t, ok in zip(s["responses"], s["correct"]) if not ok))
        for p in pos if neg else []:
            far = max(neg, key=lambda t: word_edit_distance(p, t))
            pairs.append({"prompt": PROMPT.format(question=problems[pid]["question"]), "chosen": p, "rejected": far,
                          "rejected_complete": True, "pid": pid})
    return pairs


def rft_positives(problems, samples, cap):
    """RFT filter (Yuan et al. 2023; paper sec. 4): keep samples with r(x, y) = 1, drop exact duplicates, then
    near-duplicates (same sequence of equations once words and spaces are removed, so a rephrasing of the same
    computation counts once, the D_syn solution included), keep at most `cap` per problem.
    -> [{"question", "response"}] ready for the SFT loop."""
    kept = []
    for prob, s in zip(problems, samples):
        seen = {_equations(prob["response"])} if prob.get("response") else set()
        n = 0
        for text, ok in zip(s["responses"], s["correct"]):
            key = _equations(text)
            if ok and key not in seen and n < cap:
                seen.add(key)
                kept.append({"question": prob["question"], "response": text})
                n += 1
    return kept


def _equations(text):
    return re.sub(r"[^0-9=+\-*/().^]", "", text)


# ---------------------------------------------------------------------------------------------------------------
# Losses: pure functions of tensors.
# ---------------------------------------------------------------------------------------------------------------


def sft_loss(token_logps, mask, n_tokens=None):
    """-mean log pi(y_t | x, y_<t) over response tokens. token_logps, mask: (B, T). With micro-batches, n_tokens
    is the whole batch's count, so the micro-batch losses add up to the batch's loss."""
    return -(token_logps * mask).sum() / (mask.sum() if n_tokens is None else n_tokens).clamp(min=1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO (Rafailov et al. 2023), the paper's eq. for per-step pairs with pi_ref = pi_sft:
        L = -log sigma( beta [log pi(y+|p) - log pi_ref(y+|p)] - beta [log pi(y-|p) - log pi_ref(y-|p)] )
    All arguments (B,): summed log-probs of each response given its prompt. At pi = pi_ref, L = log 2.
    -> (loss scalar, chosen rewards (B,), rejected rewards (B,))"""
    chosen_reward = beta * (policy_chosen - ref_chosen)           # (B,)
    rejected_reward = beta * (policy_rejected - ref_rejected)     # (B,)
    loss = -F.logsigmoid(chosen_reward - rejected_reward).mean()
    return loss, chosen_reward.detach(), rejected_reward.detach()


def awr_weights(advantages, beta, clip=20.0):
    """The paper's RL view of per-step DPO: its optimum is pi*(a|s) ~ pi_sft(a|s) exp(A(s, a) / beta). Advantage-
    weighted regression reaches for it directly: w_i = exp(A_i / beta), normalised to mean 1 over the batch, clipped.
    advantages (B,) -> weights (B,), no gradient.   A = [-1, 0, 1], beta 0.5 -> [0.048, 0.352, 2.600]"""
    w = torch.exp((advantages - advantages.max()) / beta)                     # (B,), the max subtracted: no overflow
    return (w / w.mean()).clamp(max=clip).detach()


def awr_loss(logps, weights, n_rows=None):
    """L = -(1/B) sum_i w_i log pi(step_i | prefix_i). logps, weights: (B,); n_rows: the whole batch's B under
    micro-batches, so the pieces add up to the batch's loss."""
    return -(weights * logps).sum() / (len(logps) if n_rows is None else n_rows)


# ---------------------------------------------------------------------------------------------------------------
# Training loops: plain PyTorch; AdamW with linear warmup and decay, gradients clipped to norm 1 (make_optimizer and
# optimizer_step, with bf16's fp32 masters, after the method).
# ---------------------------------------------------------------------------------------------------------------


def epoch_batches(rng, lengths, cfg):
    """One epoch as lists of example indices: shuffled, cut into batches. With --sort_len, examples of similar length
    share a batch (sorted within windows of 64 batches, then the batches shuffled), so little of a batch is padding.
    lengths [9, 50, 10, 52], batch 2, sort_len -> [[1, 3], [2, 0]] (or the other batch first)"""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if not cfg.sort_len:
        return [order[b:b + cfg.batch_size] for b in range(0, len(order), cfg.batch_size)]
    batches, window = [], 64 * cfg.batch_size
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: lengths[i])
        batches += [chunk[b:b + cfg.batch_size] for b in range(0, len(chunk), cfg.batch_size)]
    rng.shuffle(batches)
    return batches


def train_sft(model, tok, examples, cfg, epochs, lr, desc, ckpt=None, val=None):
    """SFT: maximise log pi(y | x) on [{"question", "response"}], loss on response tokens only. Examples with an
    "advantage" (AWR: {"prompt", "response", "complete", "advantage"}) are weighted by awr_weights instead.
    With val problems (--val), greedy accuracy on them 16 times a run; the model ends at its best (keep_best)."""
    device = next(model.parameters()).device
    data = [encode(tok, e.get("prompt") or PROMPT.format(question=e["question"]), e["response"],
                   complete=e.get("complete", True)) for e in examples]
    adv = [e["advantage"] for e in examples] if examples and "advantage" in examples[0] else None
    rng = random.Random(cfg.seed)
    per_epoch = math.ceil(len(data) / cfg.batch_size)
    steps = cfg.sft_steps or epochs * per_epoch
    mb = cfg.micro_batch or cfg.batch_size
    fwd = prepare_training(model, cfg, desc)
    opt, sched = make_optimizer(model, lr, steps)
    st = {"log": [], "truncated": 0, "train_tokens": 0, "made_by": train_fingerprint(cfg, desc, lr, data)}
    start, step, t0, tok_now = load_train_state(ckpt, model, opt, sched, st), 0, time.time(), 0
    bar = tqdm(total=steps, initial=start, desc=desc, leave=False)
    for epoch in range(math.ceil(steps / per_epoch)):
        # every epoch's order is replayed on resume, so the data position is exact
        for rows in epoch_batches(rng, [len(p) + len(r) for p, r in data], cfg):
            step += 1
            if step <= start or step > steps:
                continue
            batch, loss = [data[i] for i in rows], 0.0
            seen = [min(len(p) + len(r), cfg.max_len) for p, r in batch]     # tokens the model reads (truncated)
            n_tokens = torch.tensor(float(sum(max(0, s - len(p)) for s, (p, _) in zip(seen, batch))),
                                    device=device)                           # response tokens of the whole batch
            w = awr_weights(torch.tensor([adv[i] for i in rows], device=device), cfg.beta_awr) if adv else None
            for m in range(0, len(batch), mb * WORLD):  # micro-batches; under torchrun each rank takes every WORLD-th
                share = batch[m:m + mb * WORLD][RANK::WORLD]
                ids, att, mask, _ = batch_tensors(tok, share or batch[m:m + 1], cfg.max_len, device)
                logits = fwd(input_ids=ids, attention_mask=att).logits[:, :-1].float()            # (B, T-1, V)
                token_logps = -F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
                # x WORLD: DDP averages the ranks' gradients, the batch's loss is their sum (an idle rank adds 0)
                if w is None:
                    piece = sft_loss(token_logps, mask[:, 1:], n_tokens) * (WORLD if share else 0)
                else:
                    mine = w[m:m + mb * WORLD][RANK::WORLD] if share else w[:0]
                    piece = awr_loss((token_logps * mask[:, 1:]).sum(-1)[:len(mine)], mine, len(batch)) * WORLD
                check_finite(piece, desc)
                piece.backward()
                loss += piece.item() / WORLD
            st["truncated"] += sum(len(p) + len(r) > cfg.max_len for p, r in batch)
            st["train_tokens"], tok_now = st["train_tokens"] + sum(seen), tok_now + sum(seen)
            optimizer_step(opt, sched)
            bar.update(1)
            if step % cfg.log_every == 0 or step == steps:
                log_step(st, bar, desc, steps, model, cfg, tok_now, t0, step=step, epoch=epoch,
                         loss=round(sum(gather([loss])), 4))
            if val and (step % max(1, steps // 16) == 0 or step == steps):
                keep_best(model, tok, val, cfg, step, st, os.path.dirname(ckpt), desc)
            if ckpt and step % cfg.ckpt_every == 0 and step < steps:
                save_train_state(ckpt, model, opt, sched, step, st)
    bar.close()
    if val:  # end at the best checkpoint, not the last
        restore_best(model, os.path.dirname(ckpt))
    return {"train_examples": len(data), **st}


def pair_batches(tok, pairs):
    """Each pair -> (prompt ids, chosen ids), (prompt ids, rejected ids), tokenised in the one place (encode)."""
    enc = []
    for p in pairs:
        pp, c = encode(tok, p["prompt"], p["chosen"], complete=True)
        _, r = encode(tok, p["prompt"], p["rejected"], complete=p["rejected_complete"])
        enc.append(((pp, c), (pp, r)))
    return enc


def dpo_logps(model, tok, enc_pairs, cfg, device):
    """Chosen and rejected log-probs of a batch of encoded pairs in one forward: (B,), (B,)."""
    ids, att, mask, _ = batch_tensors(tok, [c for c, _ in enc_pairs] + [r for _, r in enc_pairs], cfg.max_len, device)
    logps = sequence_logps(model, ids, att, mask)                                       # (2B,)
    return logps[:len(enc_pairs)], logps[len(enc_pairs):]


def with_reference_logps(model, tok, pairs, cfg, desc):
    """The pairs with log pi_ref(chosen | prompt) and log pi_ref(rejected | prompt) added, from `model` = pi_sft, in
    batches with no grad: computed once per pair set and stored with the pairs (the column names TRL reads), so no
    reference model stays resident while the policy trains.
    {"prompt", "chosen", "rejected", ...} -> {..., "ref_chosen_logps": -3.21, "ref_rejected_logps": -9.87}"""
    device, enc, out = next(model.parameters()).device, pair_batches(tok, pairs), []
    starts = range(0, len(enc), cfg.batch_size)
    model.eval()
    with torch.no_grad():
        for first in tqdm(range(0, len(starts), WORLD), desc=f"{desc}: reference log-probs", leave=False):
            mine = []  # a round: under torchrun each rank reads one batch, gathered in order
            if first + RANK < len(starts):
                b = starts[first + RANK]
                c, r = pair_logps(model, tok, enc[b:b + cfg.batch_size], cfg, device)
                mine = [{**p, "ref_chosen_logps": x, "ref_rejected_logps": y}
                        for p, x, y in zip(pairs[b:b + cfg.batch_size], c.float().tolist(), r.float().tolist())]
            out += gather(mine)
    return out


def pair_logps(model, tok, enc_pairs, cfg, device):
    """(log pi(chosen), log pi(rejected)) of a batch of pairs: branched from the shared prompt (--branch), else two
    full forwards (also under --grad_ckpt, where transformers turns the KV cache off)."""
    logps = branched_logps if cfg.branch and not cfg.grad_ckpt else dpo_logps
    return logps(model, tok, enc_pairs, cfg, device)


def train_dpo(model, tok, pairs, cfg, desc, ckpt=None):
    """DPO against the frozen pi_sft, whose log-probs the pairs carry (with_reference_logps; added here if not)."""
    device = next(model.parameters()).device
    if pairs and "ref_chosen_logps" not in pairs[0]:
        pairs = with_reference_logps(model, tok, pairs, cfg, desc)
    enc = pair_batches(tok, pairs)
    ref_c = torch.tensor([p["ref_chosen_logps"] for p in pairs], device=device)          # (N,)
    ref_r = torch.tensor([p["ref_rejected_logps"] for p in pairs], device=device)        # (N,)
    rng = random.Random(cfg.seed)
    steps = cfg.dpo_epochs * math.ceil(len(enc) / cfg.batch_size)
    mb = cfg.micro_batch or cfg.batch_size
    # beta2 = 0.999: a fine-tuning run this short is hurt by Adam's noisy early second-moment estimates
    fwd = prepare_training(model, cfg, desc, per_example=2)
    opt, sched = make_optimizer(model, cfg.dpo_lr, steps, betas=(0.9, 0.999))
    st = {"log": [], "train_tokens": 0, "made_by": train_fingerprint(cfg, desc, cfg.dpo_lr,
                                                                   [[p["prompt"], p["chosen"], p["rejected"]] for p in pairs])}
    start, step, t0, seen, tok_now = load_train_state(ckpt, model, opt, sched, st), 0, time.time(), 0, 0
    bar = tqdm(total=steps, initial=start, desc=desc, leave=False)
    for epoch in range(cfg.dpo_epochs):
        for idx in epoch_batches(rng, [len(c[0]) + len(c[1]) + len(r[1]) for c, r in enc], cfg):
            step += 1
            if step <= start:
                continue
            loss, cr, rr = 0.0, [], []
            for m in range(0, len(idx), mb * WORLD):  # micro-batches (and ranks): each piece's mean loss, weighted
                share = idx[m:m + mb * WORLD][RANK::WORLD]     # by its share of the batch (x WORLD: DDP averages)
                part = share or idx[m:m + 1]
                pc, pr = pair_logps(fwd, tok, [enc[i] for i in part], cfg, device)
                piece, c, r = dpo_loss(pc, pr, ref_c[part], ref_r[part], cfg.beta)
                piece = piece * len(share) / len(idx) * WORLD
                check_finite(piece, desc)
                piece.backward()
                loss, cr, rr = loss + piece.item() / WORLD, cr + [c], rr + [r]
            cr, rr = torch.cat(cr), torch.cat(rr)
            optimizer_step(opt, sched)
            seen += len(idx)
            st["train_tokens"] += sum(len(p) + len(r) for i in idx for p, r in enc[i])
            tok_now += sum(len(c[0]) + len(c[1]) + len(r[1]) for c, r in (enc[i] for i in idx))  # what a pair needs
            bar.update(1)
            if step % cfg.log_every == 0 or step == steps:
                log_step(st, bar, desc, steps, model, cfg, tok_now, t0, step=step, loss=round(sum(gather([loss])), 4),
                         chosen_reward=round(cr.mean().item(), 4), rejected_reward=round(rr.mean().item(), 4),
                         pair_acc=round((cr > rr).float().mean().item(), 3),
                         pairs_per_s=round(seen / (time.time() - t0), 1))
            if ckpt and step % cfg.ckpt_every == 0 and step < steps:
                save_train_state(ckpt, model, opt, sched, step, st)
    bar.close()
    return {"pairs": len(pairs), **st}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: greedy pass@1 and the count of unparsable answers.
# ---------------------------------------------------------------------------------------------------------------


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority(answers):
    """The most common answer, answers grouped by is_equiv; a tie goes to the group seen first; None if none parsed.
    ["1/2", "0.5", "3", "3", None] -> "1/2" (two votes each; "1/2" came first)"""
    groups = []  # [representative, votes]
    for a in answers:
        if a is not None:
            g = next((g for g in groups if is_equiv(a, g[0])), None)
            if g is None:
                groups.append([a, 1])
            else:
                g[1] += 1
    return max(groups, key=lambda g: g[1])[0] if groups else None  # max keeps the first of equals


def evaluate(model, tok, problems, cfg, path, desc):
    """Greedy pass@1 and unparsable answers; with --eval_k K, also K samples per problem at --temperature:
    pass@K and maj@K (the majority answer right)."""
    rows = [(str(i), PROMPT.format(question=p["question"])) for i, p in enumerate(problems)]
    texts, _ = cached_generate(model, tok, rows, cfg, path + ".gen.jsonl", cfg.seed, desc, temperature=0.0)
    K = cfg.eval_k
    if K:
        krows = [(f"{i}/{j}", prompt) for i, prompt in rows for j in range(K)]
        samples, _ = cached_generate(model, tok, krows, cfg, path + ".k.gen.jsonl", cfg.seed + 1, f"{desc}, {K} samples")
    records = []
    for i, p in enumerate(problems):
        pred = extract_answer(texts[str(i)])
        records.append({"question": p["question"], "gold": p["gold"], "response": texts[str(i)], "pred": pred,
                        "correct": int(is_equiv(pred, p["gold"]))})
        if K:
            preds = [extract_answer(samples[f"{i}/{j}"]) for j in range(K)]
            right = sum(is_equiv(a, p["gold"]) for a in preds)
            vote = majority(preds)
            records[-1].update({"k_preds": preds, "k_correct": right, f"pass@{K}": pass_at_k(K, right, K),
                                "majority": vote, f"maj@{K}": int(is_equiv(vote, p["gold"]))})
    star = star_graph(problems[0]["question"])  # --task star: the planning token and the look-ups, apart
    for p, r in zip(problems, records if star else []):
        r["first_edge"] = int(star_edges_report([p], [r["response"]])["first_edge"])
    write_jsonl(path, records)
    n = len(records)
    result = {"accuracy": sum(r["correct"] for r in records) / n, "unparsable": sum(r["pred"] is None for r in records),
              "n_test": n}
    for key in ([f"pass@{K}", f"maj@{K}"] if K else []):
        result[key] = sum(r[key] for r in records) / n
    if star:
        result.update(star_edges_report(problems, [r["response"] for r in records]))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Stages: each writes its evidence under out/<stage>/ and a done.json last; a stage with done.json is reused.
# ---------------------------------------------------------------------------------------------------------------


def run_synth(cfg, train):
    """--mode synth: the paper's first stage. k samples per training problem from --teacher; the first whose final
    answer checks correct becomes that problem's D_syn solution. Writes synth/train.jsonl in the plain format
    ({"question", "answer", "response"}), ready for --train; problems the teacher never solved are left out."""
    if not cfg.teacher:
        raise SystemExit("error: --mode synth needs --teacher NAME_OR_PATH (a more capable model than the learner)")
    model, tok = load_model(cfg, cfg.teacher)
    rows = [(f"{i}/{j}", PROMPT.format(question=p["question"])) for i, p in enumerate(train) for j in range(cfg.k_samples)]
    texts, st = cached_generate(model, tok, rows, cfg, f"{cfg.out}/synth/generations.jsonl", cfg.seed,
                                "sampling from the teacher")
    kept = []
    for i, p in enumerate(train):
        right = [t for t in (texts[f"{i}/{j}"] for j in range(cfg.k_samples)) if reward(t, p["gold"])]
        if right:
            kept.append({"question": p["question"], "answer": p["gold"], "response": right[0]})
    write_jsonl(f"{cfg.out}/synth/train.jsonl", kept)
    print(f"D_syn: {len(kept)} of {len(train)} problems solved by {cfg.teacher} in {cfg.k_samples} samples "
          f"({st['tokens']} tokens) -> {cfg.out}/synth/train.jsonl (use it as --train)")
    return kept


def run_base(cfg, shipped=True):
    """The pretrained base every method starts from (--task bigstep with --model tiny), as the paper's methods all start
    from one pretrained LLM: the tiny model trained for --base_steps on fresh lists of the task's operations, in
    symbols or in the task's phrases, solved one operation a line, each seen once (base_corpus) -- the primitive
    skills, never a word problem (--task star: chains to follow, star_base_corpus). It follows --base_seed, not --seed:
    every seed starts from the same base. With the shipped settings it is data: data/TASK/base (--mode make_data
    writes it), checked, not trained; other settings (--d_model, --base_steps, ...) train one of their own in
    out/base. -> cfg with --model pointing at it."""
    if cfg.task not in ("bigstep", "star") or cfg.model != "tiny" or not cfg.base_steps:
        return cfg
    if shipped and shipped_base_fits(cfg):
        return dataclasses.replace(cfg, model=SHIPPED_BASE[cfg.task])
    path = f"{cfg.out}/base/model"
    if not stage_done(cfg, "base"):
        t0 = time.time()
        bc = dataclasses.replace(cfg, seed=cfg.base_seed, sft_steps=cfg.base_steps)
        model, tok = load_model(bc, "tiny")
        os.makedirs(f"{cfg.out}/base", exist_ok=True)
        corpus = (star_base_corpus if cfg.task == "star" else base_corpus)(bc.seed, cfg.base_steps * cfg.batch_size)
        res = train_sft(model, tok, corpus, bc, 1, cfg.lr, "base",
                        f"{cfg.out}/base/train_state.pt")
        save_model(model, tok, path)
        finish_stage(cfg, "base", {**res, "wall_s": round(time.time() - t0, 1)})
    return dataclasses.replace(cfg, model=path)


def run_sft(cfg, train, val=None):
    """pi_sft: the initial model fine-tuned on D_syn (to its best on val, with --val), or --init when given."""
    if cfg.init:
        return cfg.init
    path = f"{cfg.out}/sft/model"
    if not stage_done(cfg, "sft"):
        t0 = time.time()
        model, tok = load_model(cfg, cfg.model)
        data = [p for p in train if p["response"]]
        if not data:
            raise SystemExit(f"error: {cfg.train}: no problem has a solution to imitate (a 'response', GSM8K "
                             "'answer' or MATH 'solution' field); SFT needs D_syn")
        os.makedirs(f"{cfg.out}/sft", exist_ok=True)
        res = train_sft(model, tok, data, cfg, cfg.sft_epochs, cfg.lr, "sft", f"{cfg.out}/sft/train_state.pt", val)
        save_model(model, tok, path)
        finish_stage(cfg, "sft", {**res, "synthetic_problems": len(data), "wall_s": round(time.time() - t0, 1)})
    return path


def run_samples(cfg, train, sft_path):
    """k samples per training problem from pi_sft, with their rewards: shared by RFT, outcome DPO and per-step."""
    path = f"{cfg.out}/samples/samples.jsonl"
    if not stage_done(cfg, "samples"):
        t0 = time.time()
        model, tok = load_model(cfg, sft_path)
        rows = [(f"{i}/{j}", PROMPT.format(question=p["question"])) for i, p in enumerate(train)
                for j in range(cfg.k_samples)]
        os.makedirs(f"{cfg.out}/samples", exist_ok=True)
        texts, st = cached_generate(model, tok, rows, cfg, f"{cfg.out}/samples/generations.jsonl", cfg.seed,
                                    "sampling from pi_sft")
        samples = []
        for i, p in enumerate(train):
            resp = [texts[f"{i}/{j}"] for j in range(cfg.k_samples)]
            samples.append({"question": p["question"], "gold": p["gold"], "responses": resp,
                            "correct": [reward(r, p["gold"]) for r in resp]})
        write_jsonl(path, samples)
        n = len(samples) * cfg.k_samples
        finish_stage(cfg, "samples", {"samples": n, "sample_tokens": st["tokens"],
                                      "sample_accuracy": sum(sum(s["correct"]) for s in samples) / n,
                                      "wall_s": round(time.time() - t0, 1)})
    return read_jsonl(path)


def run_rft(cfg, train, sft_path, val=None):
    if not stage_done(cfg, "rft"):
        samples = run_samples(cfg, train, sft_path)
        t0 = time.time()
        positives = rft_positives(train, samples, cfg.rft_cap)
        write_jsonl(f"{cfg.out}/rft/positives.jsonl", positives)
        model, tok = load_model(cfg, sft_path if cfg.rft_from_sft else cfg.model)
        data = [{"question": p["question"], "response": p["response"]} for p in train if p["response"]] + positives
        res = train_sft(model, tok, data, cfg, cfg.sft_epochs, cfg.lr, "rft", f"{cfg.out}/rft/train_state.pt", val)
        save_model(model, tok, f"{cfg.out}/rft/model")
        finish_stage(cfg, "rft", {**res, "rft_positives": len(positives), "wall_s": round(time.time() - t0, 1)})
    return f"{cfg.out}/rft/model"


def run_dpo(cfg, train, sft_path, name):
    """Outcome or per-step DPO (name: dpo, per_step, per_step_oracle) from pi_sft, the frozen reference."""
    if not stage_done(cfg, name):
        samples = run_samples(cfg, train, sft_path)
        t0 = time.time()
        os.makedirs(f"{cfg.out}/{name}", exist_ok=True)
        model, tok = load_model(cfg, sft_path)
        pairs, extra = dpo_pairs(cfg, train, name, model, tok, samples)
        pairs = with_reference_logps(model, tok, pairs, cfg, name)
        write_jsonl(f"{cfg.out}/{name}/pairs.jsonl", pairs)
        if pairs:
            res = train_dpo(model, tok, pairs, cfg, name, f"{cfg.out}/{name}/train_state.pt")
        else:  # e.g. every sample right, or none: nothing to prefer, so the model stays pi_sft (and we say so)
            print(f"WARNING {name}: no pairs were built; the {name} model is pi_sft unchanged. "
                  "More problems, --k_samples or --temperature give more pairs.")
            res = {"pairs": 0, "train_tokens": 0, "log": []}
        save_model(model, tok, f"{cfg.out}/{name}/model")
        finish_stage(cfg, name, {**res, **extra, "wall_s": round(time.time() - t0, 1)})
    return f"{cfg.out}/{name}/model"


def dpo_pairs(cfg, train, name, model, tok, samples):
    """The pairs of a DPO stage -> (pairs, figures for its done.json). dpo: whole solutions (outcome_pairs); per_step:
    rollout credit (step_values, per_step_pairs); per_step_oracle: an embedded task's true pits (oracle_pairs)."""
    if name == "dpo":
        return outcome_pairs(train, samples, cfg.rft_cap), {}
    if name == "per_step_oracle":
        return oracle_pairs(train, samples, cfg), {}
    negatives = collect_negatives(train, samples, cfg.max_negatives)
    Q, wins, acct = step_values(model, tok, train, samples, negatives, cfg, f"{cfg.out}/per_step")
    pairs = per_step_pairs(train, negatives, Q, wins, cfg)
    pits = [p["pit"] for p in pairs]
    return pairs, {**acct, "negatives": len(negatives),
                   "pit_histogram": {str(c): pits.count(c) for c in sorted(set(pits))},
                   "pairs_per_1k_rollouts": round(1000 * len(pairs) / max(1, acct["rollouts"]), 1)}


def run_awr(cfg, train, sft_path):
    """--loss awr|both: per-step credit trained as advantage-weighted steps (awr_examples) instead of DPO pairs, on
    the same rollouts (per_step/rollouts.jsonl) and the same budget (--dpo_lr, --dpo_epochs); no reference model."""
    name = "per_step_awr"
    if not stage_done(cfg, name):
        samples = run_samples(cfg, train, sft_path)
        t0 = time.time()
        os.makedirs(f"{cfg.out}/{name}", exist_ok=True)
        model, tok = load_model(cfg, sft_path)
        negatives = collect_negatives(train, samples, cfg.max_negatives)
        Q, wins, acct = step_values(model, tok, train, samples, negatives, cfg, f"{cfg.out}/per_step")
        examples = awr_examples(train, negatives, Q, wins, cfg)
        write_jsonl(f"{cfg.out}/{name}/examples.jsonl", examples)
        res = train_sft(model, tok, examples, dataclasses.replace(cfg, sft_steps=0), cfg.dpo_epochs, cfg.dpo_lr, name,
                        f"{cfg.out}/{name}/train_state.pt") if examples else {"train_examples": 0, "log": []}
        save_model(model, tok, f"{cfg.out}/{name}/model")
        finish_stage(cfg, name, {**res, **acct, "negatives": len(negatives), "wall_s": round(time.time() - t0, 1)})
    return f"{cfg.out}/{name}/model"


AUDIT_BELOW = -0.5  # a step of a correct sample is flagged when it costs more than half the prefix's chance to finish


def run_audit(cfg, train, sft_path):
    """--audit N: the paper's spurious steps (a right answer reached through a wrong or useless step, which imitation
    of positives keeps) looked for in pi_sft's correct samples: the first N distinct ones, Q-hat at every prefix from
    M rollouts (step_values, every prefix), A_i = Q_i - Q_{i-1}, a step flagged when A_i < AUDIT_BELOW. On an
    embedded task the truth scores the flags (first_wrong_step: the sample's first wrong step).
    -> audit/steps.jsonl: {"pid", "nid", "step", "text", "advantage", "flagged", "first_wrong"}; the counts"""
    result = stage_done(cfg, "audit")
    if not result or result["asked"] != cfg.audit:  # --audit is not a result setting: another N redoes this stage
        samples = run_samples(cfg, train, sft_path)
        t0 = time.time()
        model, tok = load_model(cfg, sft_path)
        right = collect_negatives(train, samples, cfg.max_negatives, right=1)[:cfg.audit]
        Q, _, acct = step_values(model, tok, train, samples, right, dataclasses.replace(cfg, credit="min_advantage"),
                                 f"{cfg.out}/audit")
        rows, truth = [], {}
        for n in right:
            q, question = Q[n["nid"]], train[n["pid"]]["question"]
            truth[n["nid"]] = first_wrong_step(n["steps"], question) if has_truth(question) else None
            rows += [{"pid": n["pid"], "nid": n["nid"], "step": i, "text": n["steps"][i - 1],
                      "advantage": q[i] - q[i - 1], "flagged": q[i] - q[i - 1] < AUDIT_BELOW,
                      "first_wrong": truth[n["nid"]] == i} for i in range(1, len(q))]
        write_jsonl(f"{cfg.out}/audit/steps.jsonl", rows)
        flagged = {r["nid"] for r in rows if r["flagged"]}
        spurious = {nid for nid, w in truth.items() if w}
        result = finish_stage(cfg, "audit", {
            **acct, "asked": cfg.audit, "audited": len(right), "with_a_wrong_step": len(spurious),
            "flagged_samples": len(flagged),
            "flagged_steps": sum(r["flagged"] for r in rows),
            "precision": round(len(flagged & spurious) / len(flagged), 3) if flagged else None,
            "recall": round(len(flagged & spurious) / len(spurious), 3) if spurious else None,
            "flags_on_the_first_wrong_step": sum(r["flagged"] and r["first_wrong"] for r in rows),
            "wall_s": round(time.time() - t0, 1)})
    print(f"audit: {result['audited']} correct samples, {result['with_a_wrong_step']} holding a wrong step by the "
          f"truth, {result['flagged_samples']} flagged (precision {result['precision']}, recall {result['recall']})")
    return result


def run_eval(cfg, test, name, model_path):
    result = stage_done(cfg, f"eval_{name}")
    if not result:
        t0 = time.time()
        model, tok = load_model(cfg, model_path)
        os.makedirs(f"{cfg.out}/eval_{name}", exist_ok=True)
        result = evaluate(model, tok, test, cfg, f"{cfg.out}/eval_{name}/responses.jsonl", f"eval {name}")
        result = finish_stage(cfg, f"eval_{name}", {**result, "model": model_path, "wall_s": round(time.time() - t0, 1)})
    k = "".join(f", {key} {result[key]:.3f}" for key in (f"pass@{cfg.eval_k}", f"maj@{cfg.eval_k}") if key in result)
    star = f", first edge {result['first_edge']:.3f}, later edges follow the graph {result['follows_graph']:.3f}" \
        if "first_edge" in result else ""
    print(f"eval {name}: accuracy {result['accuracy']:.3f}{k}{star} ({result['n_test']} problems, "
          f"{result['unparsable']} unparsable)")
    return result


def run_pipeline(cfg, train, test, stages, val=None):
    """pi_sft, then each requested stage from it ("rft", "dpo", "per_step"), every model evaluated on test.
    -> {stage: eval result}"""
    cfg = run_base(cfg)
    sft = run_sft(cfg, train, val)
    results = {"sft": run_eval(cfg, test, "sft", sft)}
    if "rft" in stages:
        results["rft"] = run_eval(cfg, test, "rft", run_rft(cfg, train, sft, val))
    if "dpo" in stages:
        results["dpo"] = run_eval(cfg, test, "dpo", run_dpo(cfg, train, sft, "dpo"))
    if "per_step" in stages and cfg.loss in ("dpo", "both"):
        results["per_step"] = run_eval(cfg, test, "per_step", run_dpo(cfg, train, sft, "per_step"))
    if "per_step" in stages and cfg.loss in ("awr", "both"):
        results["per_step_awr"] = run_eval(cfg, test, "per_step_awr", run_awr(cfg, train, sft))
    if "per_step_oracle" in stages:  # --task star --mode all: per-step DPO on the true pits, beside the rollouts'
        results["per_step_oracle"] = run_eval(cfg, test, "per_step_oracle", run_dpo(cfg, train, sft, "per_step_oracle"))
    if cfg.audit:
        run_audit(cfg, train, sft)
    print("\n" + summary(cfg, list(results)))
    if "per_step" in results:
        print("\nOne negative, step by step (per_step/example.md):\n" + worked_example(cfg, train))
        if has_toy_truth(train[:1]):
            truth = pits_vs_truth(cfg, train)
            write_text(f"{cfg.out}/per_step/truth.json", json.dumps(truth, indent=1) + "\n")
            print(f"\nThe pits against the task's truth: {truth['pit_is_first_wrong_step']:.1%} on the first wrong "
                  f"step; pits at {truth['pit_histogram']}, first wrong steps at {truth['first_wrong_histogram']}")
    return results


def run_seeds(cfg, train, test, stages, val=None):
    """--seeds N (N > 1) on sft, rft, dpo, per_step or all: the run once per seed, each in OUT/seed<S>/ from one base
    (the data and the base are all the seeds share), then one table over them (seeds.md, seeds_table): what an
    ablation is judged by, since one seed's noise is about as large as the effects worth finding. -> {seed: results}"""
    model = run_base(cfg).model
    runs, results = {}, {}
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        runs[seed] = dataclasses.replace(cfg, seed=seed, out=f"{cfg.out}/seed{seed}", model=model)
        check_out_folder(runs[seed])
        results[seed] = run_pipeline(runs[seed], train, test, stages, val)
    text = seeds_table(runs)
    if cfg.task == "star":  # the planning token alone: 1/degree by guessing
        text += "\n\n" + seeds_table(runs, "first_edge", f"First edge right (1/{STAR['degree']} by guessing)")
    write_text(f"{cfg.out}/seeds.md", text + "\n")
    print(f"\n{text}\n\n(also in {cfg.out}/seeds.md)")
    return results


# ---------------------------------------------------------------------------------------------------------------
# The headline measurement, the data-efficiency multiplier: SFT on n, 2n, 4n, 8n problems; RFT, outcome DPO and
# per-step DPO on the first n only; fit SFT error against log(size); each method's multiplier n'/n is the SFT size
# that would match it.
# ---------------------------------------------------------------------------------------------------------------


def fit_log_curve(sizes, errors):
    """Least squares: error = a + b ln(size). -> (a, b)"""
    xs = [math.log(s) for s in sizes]
    mx, my = sum(xs) / len(xs), sum(errors) / len(errors)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, errors)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def equivalent_size(error, a, b):
    """n' with a + b ln n' = error: the SFT data size the fitted curve says reaches this error; None when SFT does
    not improve with data (b >= 0), where no size is equivalent."""
    return math.exp((error - a) / b) if b < 0 else None


def paired(a, b):
    """Two models' 0/1 scores on the same test problems -> (mean of a - b, the standard error of that mean)."""
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    return m, (sum((x - m) ** 2 for x in d) / max(1, len(d) - 1) / len(d)) ** 0.5


def bracket(method, sft):
    """The multiplier as measured, no fit: the largest SFT size the method beats on the test problems and the smallest
    it does not, each (size, difference, its standard error), None where there is none.
    method: its 0/1 per test problem; sft: {size: 0/1 per test problem}.
    0.45 against SFT 0.31 / 0.34 / 0.39 / 0.48 on 100 .. 800 problems -> ((400, 0.06, 0.03), (800, -0.03, 0.03)):
    worth between 4x and 8x the data."""
    scored = [(m, *paired(method, sft[m])) for m in sorted(sft)]
    return max((s for s in scored if s[1] > 0), default=None), min((s for s in scored if s[1] <= 0), default=None)


def run_scaling(cfg, train, test, val=None):
    """--mode scaling: per seed, SFT on the first n, 2n, ..., 2^d n problems (nested), RFT / outcome DPO / per-step DPO
    from the SFT model on the first n, RFT again with per-step's sampling budget (samples + rollouts, counted in
    generated tokens), and on the toy per-step DPO once more with the true pits (oracle_pairs). Every model on the
    same test split; the multipliers, budgets and credit checks -> scaling.md, the picture -> scaling.svg."""
    t0, n = time.time(), cfg.n_train
    sizes = [n * 2 ** d for d in range(cfg.doublings + 1)]
    if cfg.loss == "awr":
        raise SystemExit("error: --mode scaling measures per-step DPO; use --loss dpo, or both for an AWR row beside it")
    if n < 1 or len(train) < sizes[-1]:
        raise SystemExit(f"error: {cfg.train}: --mode scaling needs n_train >= 1 and {sizes[-1]} training problems "
                         f"(n = {n} times 2^{cfg.doublings}); it has {len(train)}")
    epochs = dict(zip(sizes, map(int, cfg.size_epochs.split(",")))) if cfg.size_epochs else {}
    size_steps = {m: cfg.sft_steps or epochs.get(m, cfg.sft_epochs) * math.ceil(m / cfg.batch_size) for m in sizes}
    steps = sum(size_steps.values())
    print(f"scaling: {cfg.seeds} seed(s), each SFT on {sizes} problems ({steps} SFT steps), then sampling, rollouts "
          f"and DPO on the first {n}; SFT is most of the time (README: measured wall times)")
    rows, credit, chosen, pooled = [], [], [], {}  # pooled: {method: [its 0/1s, {size: SFT's 0/1s}]} over seeds
    model = run_base(cfg).model  # one base for every seed (--base_seed)
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        def sub(name, m, **kw):  # RFT and the DPOs on n train with n's epochs
            c = dataclasses.replace(cfg, seed=seed, n_train=m, out=f"{cfg.out}/seed{seed}/{name}", model=model,
                                    **{"sft_epochs": epochs.get(m, cfg.sft_epochs), **kw})
            check_out_folder(c)
            return c
        acc = {}
        for m in sizes:
            res = run_pipeline(sub(f"n{m}", m), train[:m], test, ["rft", "dpo", "per_step"] if m == n else [], val)
            acc.update({f"sft_{m}": res["sft"]["accuracy"]} if m != n else {k: r["accuracy"] for k, r in res.items()})
        base = sub(f"n{n}", n)
        smp, ps = stage_done(base, "samples"), stage_done(base, "per_step")
        k_budget = math.ceil(cfg.k_samples * (smp["sample_tokens"] + ps["rollout_tokens"]) / smp["sample_tokens"])
        bud = sub("rft_budget", n, k_samples=k_budget, init=f"{base.out}/sft/model")
        acc["rft_budget"] = run_pipeline(bud, train[:n], test, ["rft"], val)["rft"]["accuracy"]
        toy = has_toy_truth(train[:n])
        if toy:  # the same DPO on pairs with the toy's true pits: what perfect credit would give
            path = run_dpo(base, train[:n], f"{base.out}/sft/model", "per_step_oracle")
            acc["per_step_oracle"] = run_eval(base, test, "per_step_oracle", path)["accuracy"]
        a, b = fit_log_curve(sizes, [1 - acc.get(f"sft_{m}", acc["sft"]) for m in sizes])
        sft_tok = stage_done(base, "sft")["train_tokens"]
        budget = {"sft": (n, 0, 0, 0, sft_tok),
                  **{f"sft_{m}": (m, 0, 0, 0, stage_done(sub(f"n{m}", m), "sft")["train_tokens"]) for m in sizes[1:]},
                  "rft": (n, smp["samples"], 0, smp["sample_tokens"], sft_tok + stage_done(base, "rft")["train_tokens"]),
                  "rft_budget": (n, n * k_budget, 0, stage_done(bud, "samples")["sample_tokens"],
                                 sft_tok + stage_done(bud, "rft")["train_tokens"]),
                  "dpo": (n, smp["samples"], 0, smp["sample_tokens"], sft_tok + stage_done(base, "dpo")["train_tokens"]),
                  "per_step": (n, smp["samples"], ps["rollouts"], smp["sample_tokens"] + ps["rollout_tokens"],
                               sft_tok + ps["train_tokens"])}
        if cfg.loss == "both":  # the same rollouts, trained as advantage-weighted steps
            budget["per_step_awr"] = (n, smp["samples"], ps["rollouts"], smp["sample_tokens"] + ps["rollout_tokens"],
                                      sft_tok + stage_done(base, "per_step_awr")["train_tokens"])
        if toy:
            budget["per_step_oracle"] = (n, smp["samples"], 0, smp["sample_tokens"],
                                         sft_tok + stage_done(base, "per_step_oracle")["train_tokens"])
        where = {"sft": (base, "sft"), "rft_budget": (bud, "rft"),
                 **{f"sft_{m}": (sub(f"n{m}", m), "sft") for m in sizes[1:]}}  # (folder, stage) of each eval
        right = {}  # each model's 0/1 on the test problems, for the paired brackets
        for k in budget:
            c, stage = where.get(k, (base, k))
            right[k] = [r["correct"] for r in read_jsonl(f"{c.out}/eval_{stage}/responses.jsonl")]
        sft = {m: right["sft" if m == n else f"sft_{m}"] for m in sizes}
        for method, (problems, samples, rollouts, sampled, trained) in budget.items():
            eq = equivalent_size(1 - acc[method], a, b)
            inside = eq is not None and sizes[0] / 1.01 <= eq <= sizes[-1] * 1.01  # read only where SFT was measured
            beats, trails = bracket(right[method], sft)
            rows.append({"stage": "scaling", "seed": seed, "method": method, "problems": problems,
                         "accuracy": acc[method], "sft_equivalent_problems": eq and round(eq),
                         "multiplier": round(eq / n, 2) if inside else None, "fit_multiplier": eq and round(eq / n, 2),
                         "beats": beats, "trails": trails, "samples": samples, "rollouts": rollouts,
                         "tokens_sampled": sampled, "tokens_trained": trained, "fit_a": round(a, 4), "fit_b": round(b, 4)})
            pooled.setdefault(method, [[], {m: [] for m in sizes}])
            pooled[method][0].extend(right[method])
            for m in sizes:
                pooled[method][1][m].extend(sft[m])
        credit.append({"stage": "scaling_credit", "seed": seed, **credit_report(base, train[:n])})
        if val:  # the steps validation chose, per size: a curve of data, not of steps
            chosen.append(f"- seed {seed}: best validation step of SFT on " + ", ".join(
                f"{m}: {stage_done(sub(f'n{m}', m), 'sft')['best_step']} of {size_steps[m]}" for m in sizes)
                + f"; RFT on {n}: {stage_done(base, 'rft')['best_step']}")
    write_jsonl(f"{cfg.out}/metrics.jsonl", rows + credit, mode="a")
    pooled = {k: bracket(*v) for k, v in pooled.items()}
    text = scaling_table(rows, credit, sizes, time.time() - t0, pooled) + "".join("\n" + line for line in chosen)
    write_text(f"{cfg.out}/scaling.md", text + "\n")
    write_text(f"{cfg.out}/scaling.svg", scaling_svg(rows, sizes, pooled))
    print("\n" + text + f"\n\npicture: {cfg.out}/scaling.svg")
    return rows, credit


# ===============================================================================================================
# Machinery: what a reader of the method can skip. The method above calls these by name: the embedded tasks' truth
# (credit checked against it), processes (torchrun), atomic files, the answer checker's rules, LoRA, the sampler's KV
# cache and the resumable generation cache, checkpoints, validation and MFU accounting, stage book-keeping, reports
# (the summary table, the worked example, the scaling table and picture), the command line, the benchmarks.
# ===============================================================================================================


# ---------------------------------------------------------------------------------------------------------------
# The embedded tasks' extras: the first toy's generator (--task arith), and the truth: every step of a toy
# solution can be checked exactly, so the rollout credit is checked against it (credit_report) and replaced by
# it (oracle_pairs: the scaling run's perfect credit).
# ---------------------------------------------------------------------------------------------------------------


def make_problem(rng):
    """One GSM8K-style word problem, one computation per solution line.
    -> {"question": "Mia has 7 pens. Mia buys 5 more. Mia gives away 3. How many pens now?",
        "answer": "9", "response": "7 + 5 = 12\\n12 - 3 = 9\\nThe answer is 9"}"""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    value = rng.randint(2, 15)
    sentences, lines = [f"{name} has {value} {item}."], []
    for _ in range(rng.randint(2, 3)):
        divisors = [d for d in (2, 3, 4) if value % d == 0]
        op = rng.choice([o for o in "+-*/" if (o != "-" or value > 1) and (o != "*" or value <= 15)
                         and (o != "/" or divisors)])
        if op == "+":
            n = rng.randint(1, 15)
            sentences.append(f"{name} {rng.choice(['buys', 'finds', 'gets'])} {n} more.")
        elif op == "-":
            n = rng.randint(1, value - 1)
            sentences.append(f"{name} {rng.choice(['gives away', 'loses', 'sells'])} {n}.")
        elif op == "*":
            n = rng.randint(2, 4)
            sentences.append(f"{name} {['doubles', 'triples', 'quadruples'][n - 2]} them.")
        else:
            n = rng.choice(divisors)
            sentences.append(f"{name} keeps {['half', 'a third', 'a quarter'][n - 2]} of them.")
        new = {"+": value + n, "-": value - n, "*": value * n, "/": value // max(n, 1)}[op]
        lines.append(f"{value} {op} {n} = {new}")
        value = new
    sentences.append(f"How many {item} now?")
    return {"question": " ".join(sentences), "answer": str(value), "response": "\n".join(lines + [f"The answer is {value}"])}


STAR = {"degree": 2, "arm": 3, "labels": 50}  # --task star's graphs (data/star/README.md: the screens that chose it)
STAR_Q = re.compile(r"Edges: (.*)\. Path from (\d+) to (\d+)\?")


def make_star_problem(rng, degree=None, arm=None, labels=None):
    """--task star: the path-star graph of Bachmann & Nagarajan (2024), the paper's picture of why per-step credit
    helps. `degree` arms of `arm` edges leave a start node; every label is drawn fresh per graph from 1..labels; the
    edge list is shuffled; the question asks for the path from the start to the end of one arm. Every edge after the
    first is a look-up (the one edge leaving the previous node); the first needs a plan (which arm ends at the goal).
    -> {"question": "Edges: 7 > 31, 12 > 40, 5 > 7, 40 > 3, 5 > 12, 31 > 9. Path from 5 to 3?",
        "answer": "5 > 12 > 40 > 3", "response": "5 > 12\n12 > 40\n40 > 3\nThe answer is 5 > 12 > 40 > 3"}"""
    degree, arm, labels = degree or STAR["degree"], arm or STAR["arm"], labels or STAR["labels"]
    nodes = rng.sample(range(1, labels + 1), 1 + degree * arm)
    start, arms = nodes[0], [nodes[1 + a * arm:1 + (a + 1) * arm] for a in range(degree)]
    edges = [(u, v) for a in arms for u, v in zip([start] + a, a)]
    rng.shuffle(edges)
    path = [start] + rng.choice(arms)
    return {"question": star_question(edges, start, path[-1]), "answer": " > ".join(map(str, path)),
            "response": star_solution(path)}


def star_question(edges, start, goal):
    return "Edges: " + ", ".join(f"{u} > {v}" for u, v in edges) + f". Path from {start} to {goal}?"


def star_solution(path):
    """One edge a line, then the path: [5, 12, 40] -> "5 > 12\n12 > 40\nThe answer is 5 > 12 > 40"."""
    return "\n".join([f"{u} > {v}" for u, v in zip(path, path[1:])] + ["The answer is " + " > ".join(map(str, path))])


def star_base_corpus(seed, n):
    """What the star learner is pretrained on (the primitive: looking an edge up in a list): fresh graphs of as many
    edges as the task's, but one arm (a chain, shuffled), to follow from its start: every step a look-up, no plan.
    -> [{"question": "Edges: 40 > 3, 5 > 7, 12 > 40, 7 > 31, 31 > 12, 3 > 9. Follow from 5.",
         "response": "5 > 7\n7 > 31\n...\nThe answer is 5 > 7 > 31 > 12 > 40 > 3 > 9"}]"""
    rng, rows = random.Random(seed), []
    for _ in range(n):
        p = make_star_problem(rng, degree=1, arm=STAR["degree"] * STAR["arm"])
        start = p["answer"].split(" > ")[0]
        rows.append({"question": p["question"].split(". Path")[0] + f". Follow from {start}.", "response": p["response"]})
    return rows


def star_graph(question):
    """A star question read back: ([(u, v)], start, goal), or None for any other question."""
    m = STAR_Q.fullmatch(question)
    if not m:
        return None
    return [tuple(map(int, e.split(" > "))) for e in m[1].split(", ")], int(m[2]), int(m[3])


def star_path(question):
    """The true path of a star question: from the goal back along its parents to the start."""
    edges, start, goal = star_graph(question)
    parent, path = {v: u for u, v in edges}, [goal]
    while path[-1] != start:
        path.append(parent[path[-1]])
    return [str(v) for v in reversed(path)]


def star_edges_report(problems, responses):
    """How a model's star answers go wrong: the first edge right (the planning token: 1/degree by guessing), and every
    later edge that follows the graph from the model's own previous node (the look-up, Clever Hans' shortcut).
    -> {"first_edge": share of problems, "follows_graph": share of later edge lines}"""
    first = follow = later = 0
    for p, text in zip(problems, responses):
        edges, path = set(star_graph(p["question"])[0]), star_path(p["question"])
        lines = [re.fullmatch(r"(\d+) > (\d+)", line.strip()) for line in text.split("\n")]
        lines = [(int(m[1]), int(m[2])) for m in lines if m]
        first += bool(lines) and lines[0] == (int(path[0]), int(path[1]))
        for (_, prev), (u, v) in zip(lines, lines[1:]):
            later, follow = later + 1, follow + (u == prev and (u, v) in edges)
    return {"first_edge": round(first / max(1, len(problems)), 4), "follows_graph": round(follow / max(1, later), 4)}


TOY_SENTENCE = re.compile(r"(buys|finds|gets) (\d+) more|(gives away|loses|sells) (\d+)\.|(doubles|triples|quadruples) "
                          r"them|keeps (half|a third|a quarter) of")
TOY_STEP = re.compile(r"(-?\d+)((?: [-+*/] \d+)+) = (-?\d+)\n?")


def toy_chain(question):
    """An embedded task's question read back into its chain: "Mia has 7 pens. Mia buys 5 more. Mia doubles them. ..."
    -> (7, [("+", 5), ("*", 2)]); None for any other question (real data has no computable truth)."""
    start = re.match(r"\w+ has (\d+) \w+\.", question)
    if not start:
        return None
    ops = []
    for m in TOY_SENTENCE.finditer(question):
        if m[1]:
            ops.append(("+", int(m[2])))
        elif m[3]:
            ops.append(("-", int(m[4])))
        elif m[5]:
            ops.append(("*", ["doubles", "triples", "quadruples"].index(m[5]) + 2))
        else:
            ops.append(("/", ["half", "a third", "a quarter"].index(m[6]) + 2))
    return int(start[1]), ops


def has_truth(question):
    """Does this question come from an embedded task, whose every step can be checked?"""
    return bool(toy_chain(question) or star_graph(question))


def has_toy_truth(problems):
    """An embedded task's problems: every question reads as a chain (or a star graph) whose value is the gold, and its
    D_syn solution reaches it (--slips keeps that)."""
    return all(has_truth(p["question"]) and p["response"] and reward(p["response"], p["gold"]) for p in problems)


def first_wrong_step(steps, question):
    """The truth on an embedded task: the first step (1-based) that is wrong, or None if none is. A step is right when
    it starts from the running value, applies the question's next operation in order (or a run of +/- operations in
    one line, which reads the same left to right) and computes it exactly; the last step must be "The answer is"
    the final value, after every operation. On the star task: the first line that is not the true path's next edge
    (the last must be "The answer is" the path)."""
    if star_graph(question):
        path = star_path(question)
        for i, step in enumerate(steps):
            if step.strip() != (f"{path[i]} > {path[i + 1]}" if i < len(path) - 1 else
                                "The answer is " + " > ".join(path)):
                return i + 1
            if i == len(path) - 1:
                return None if i == len(steps) - 1 else i + 2
        return len(steps) + 1
    value, ops = toy_chain(question)
    done = 0
    for i, step in enumerate(steps):
        m = TOY_STEP.fullmatch(step.strip())
        if m and int(m[1]) == value:
            mine = [(op, int(n)) for op, n in re.findall(r"([-+*/]) (\d+)", m[2])]
            if mine == ops[done:done + len(mine)] and (len(mine) == 1 or all(op in "+-" for op, _ in mine)):
                for op, n in mine:
                    value = apply_op(value, op, n)
                done += len(mine)
                if value == int(m[3]):
                    continue
        if i == len(steps) - 1 and done == len(ops) and step.strip() == f"The answer is {value}":
            return None
        return i + 1
    return len(steps) + 1  # ran out of steps before the answer


def exact_rest(question, prefix):
    """The exact solution after a right prefix of steps, one operation (or edge) a line (what the oracle prefers)."""
    if star_graph(question):
        path = star_path(question)
        return "\n".join(star_solution(path).split("\n")[len(prefix):])
    value, ops = toy_chain(question)
    done = 0
    for step in prefix:
        m = TOY_STEP.fullmatch(step.strip())
        done += len(re.findall(r"[-+*/] \d+", m[2]))
        value = int(m[3])
    return chain_text(value, ops[done:])


def oracle_pairs(problems, samples, cfg):
    """Embedded tasks only: per-step pairs from the truth instead of rollouts, to tell bad credit from a weak signal.
    For each negative kept by per-step, c = its first wrong step; prompt = x + its right steps before it, chosen = the
    exact solution from there on, rejected = step c alone (the per_step_pairs step form, with perfect credit)."""
    pairs = []
    for n in collect_negatives(problems, samples, cfg.max_negatives):
        question = problems[n["pid"]]["question"]
        steps = split_steps(n["response"], cfg.step_cap)
        c = first_wrong_step(steps, question)
        if c is not None and c <= len(steps):  # a negative that stops short has no wrong step to push down
            pairs.append({"prompt": PROMPT.format(question=question) + "".join(steps[:c - 1]),
                          "chosen": exact_rest(question, steps[:c - 1]), "rejected": steps[c - 1],
                          "rejected_complete": False, "pid": n["pid"], "nid": n["nid"], "pit": c})
    return pairs


def response_logps(model, tok, items, cfg):
    """Summed log pi(response | prompt) for [(prompt, response)], batched, no grad. -> [float]"""
    device, out = next(model.parameters()).device, []
    with torch.no_grad():
        for b in range(0, len(items), cfg.batch_size):
            enc = [encode(tok, p, r, complete=True) for p, r in items[b:b + cfg.batch_size]]
            out += sequence_logps(model, *batch_tensors(tok, enc, cfg.max_len, device)[:3]).tolist()
    return out


def pits_vs_truth(cfg, train):
    """Where per-step's pits fell, against the first wrong step of each negative by the task's truth."""
    pairs = read_jsonl(f"{cfg.out}/per_step/pairs.jsonl")
    negs = {n["nid"]: n for n in collect_negatives(train, read_jsonl(f"{cfg.out}/samples/samples.jsonl"),
                                                    cfg.max_negatives)}
    truth = [first_wrong_step(split_steps(negs[p["nid"]]["response"], cfg.step_cap), train[p["pid"]]["question"])
             for p in pairs]
    n, pits = max(1, len(pairs)), [p["pit"] for p in pairs]
    return {"pairs": len(pairs), "truth": truth,
            "pit_is_first_wrong_step": round(sum(c == p for c, p in zip(truth, pits)) / n, 3),
            "pit_after_first_wrong_step": round(sum(c is not None and c < p for c, p in zip(truth, pits)) / n, 3),
            "pit_on_a_right_step": round(sum(c is None or c > p for c, p in zip(truth, pits)) / n, 3),
            "pit_histogram": {str(c): pits.count(c) for c in sorted(set(pits))},
            "first_wrong_histogram": {str(c): truth.count(c) for c in sorted(set(truth), key=str)}}


def credit_report(cfg, train):
    """On the embedded task the first wrong step of every solution is computable, so the rollout credit can be
    checked against the truth: how often the pit is the first wrong step, whether M fresh rollouts from the pit
    prefix (another seed) agree that it is dead, how many correct samples and RFT positives carry a wrong or
    useless step (the paper's spurious steps), and whether per-step DPO lowers their log-probability."""
    if not has_toy_truth(train):
        return {}
    pairs = read_jsonl(f"{cfg.out}/per_step/pairs.jsonl")
    negs = {n["nid"]: n for n in collect_negatives(train, read_jsonl(f"{cfg.out}/samples/samples.jsonl"),
                                                    cfg.max_negatives)}
    pits = pits_vs_truth(cfg, train)
    # re-estimate: M fresh rollouts (another seed) from each pit prefix x + y_{1:c}; agreement = none succeeds
    sft, tok = load_model(cfg, f"{cfg.out}/sft/model")
    prefixes = ["".join(split_steps(negs[p["nid"]]["response"], cfg.step_cap)[:p["pit"]]) for p in pairs]
    rows = [(f"{k}/{j}", PROMPT.format(question=train[p["pid"]]["question"]) + prefixes[k])
            for k, p in enumerate(pairs) for j in range(cfg.rollouts)]
    texts, _ = cached_generate(sft, tok, rows, cfg, f"{cfg.out}/per_step/reestimate.jsonl", cfg.seed + 1000003,
                               "re-estimating pit prefixes")
    dead = [not any(reward(prefixes[k] + texts[f"{k}/{j}"], train[p["pid"]]["gold"]) for j in range(cfg.rollouts))
            for k, p in enumerate(pairs)]
    # a load-bearing chain: rollouts from x + y_{1:w}, w a negative's true first wrong step, rarely reach the answer
    # (the per-step stage's own rollouts, read back from its cache: nothing is generated here)
    samples = read_jsonl(f"{cfg.out}/samples/samples.jsonl")
    Q = step_values(sft, tok, train, samples, list(negs.values()), cfg, f"{cfg.out}/per_step")[0]
    wrong_at = {nid: first_wrong_step(n["steps"], train[n["pid"]]["question"]) for nid, n in negs.items()}
    recover = [Q[nid][w] for nid, w in wrong_at.items() if w and w < len(negs[nid]["steps"]) and Q[nid][w] is not None]
    # spurious steps: correct samples whose steps differ from the exact solution; RFT positives among them
    correct = [(pid, t) for pid, s in enumerate(samples) for t, ok in zip(s["responses"], s["correct"]) if ok]
    is_spurious = lambda pid, t: first_wrong_step(split_steps(t, cfg.step_cap), train[pid]["question"]) is not None  # noqa: E731
    by_q = {p["question"]: pid for pid, p in enumerate(train)}
    positives = [(by_q[p["question"]], p["response"]) for p in rft_positives(train, samples, cfg.rft_cap)]
    spurious = [(pid, t) for pid, t in positives if is_spurious(pid, t)][:512]
    clean = [(pid, train[pid]["response"]) for pid in dict.fromkeys(pid for pid, _ in spurious)]
    shift = {}
    if spurious and os.path.exists(f"{cfg.out}/per_step/model"):
        ps, _ = load_model(cfg, f"{cfg.out}/per_step/model")
        for name, group in (("spurious", spurious), ("clean", clean)):
            items = [(PROMPT.format(question=train[pid]["question"]), t) for pid, t in group]
            before, after = response_logps(sft, tok, items, cfg), response_logps(ps, tok, items, cfg)
            shift[name] = round(sum(a - b for a, b in zip(after, before)) / len(items), 3)
    n = max(1, len(pairs))
    return {**{k: v for k, v in pits.items() if k != "truth"},
            "reestimate_agrees": round(sum(dead) / n, 3),
            "success_after_a_wrong_step": round(sum(recover) / max(1, len(recover)), 3),
            "correct_samples_with_wrong_step": round(sum(is_spurious(*c) for c in correct) / max(1, len(correct)), 3),
            "rft_positives": len(positives),
            "rft_positives_with_wrong_step": round(sum(is_spurious(*c) for c in positives) / max(1, len(positives)), 3),
            "logp_shift_spurious_positives": shift.get("spurious"), "logp_shift_exact_solutions": shift.get("clean")}


# ---------------------------------------------------------------------------------------------------------------
# Processes: one, or one per GPU (or CPU process) under torchrun: data parallel or sharded, torch's own engines.
# ---------------------------------------------------------------------------------------------------------------


RANK, WORLD = 0, 1  # this process and how many there are: torchrun --nproc_per_node N stepneg.py ... sets WORLD = N


def start_processes(cfg):
    """Under torchrun (it sets WORLD_SIZE, RANK, LOCAL_RANK): join the process group, NCCL with one GPU per rank or
    gloo on CPU. Every rank runs the same program; sampling batches are shared out, each training batch is split
    across ranks (DistributedDataParallel, or with --shard FSDP2, averages the gradients), and rank 0 alone writes
    files and prints (the other ranks' output goes to out/rank<r>.log)."""
    global RANK, WORLD
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if cfg.shard:
            raise SystemExit("error: --shard splits the model across the processes torchrun starts, and there is one; "
                             "run it as: torchrun --nproc_per_node N stepneg.py --shard true ... (N >= 2)")
        return
    cuda = pick_device(cfg) == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    RANK, WORLD = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if RANK > 0:
        os.makedirs(cfg.out, exist_ok=True)
        sys.stdout = sys.stderr = open(f"{cfg.out}/rank{RANK}.log", "w", buffering=1)


def sync():
    """Wait for every rank: what rank 0 has just written, the others may now read."""
    if WORLD > 1:
        torch.distributed.barrier()


def gather(rows):
    """Every rank's list, concatenated in rank order, on every rank."""
    if WORLD == 1:
        return rows
    parts = [None] * WORLD
    torch.distributed.all_gather_object(parts, rows)
    return [r for part in parts for r in part]


# --shard: FSDP2. Data parallel (DDP) keeps a whole copy of the weights, gradients and AdamW state in every process:
# about 16 bytes a weight, 112 GB for a 7B, more than one GPU holds. Sharded, each process keeps 1/WORLD of each
# tensor and gathers a layer's weights whole only while that layer computes. Training runs sharded; sampling runs on
# whole weights (load_model loads a whole copy per process, and validation mid-training gathers them: whole()).


def decoder_layers(model):
    """The model's repeated blocks (the classes transformers names in _no_split_modules: LlamaDecoderLayer, ...), the
    unit --shard gathers at a time."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise SystemExit(f"error: --shard: no decoder layers found in {type(model).__name__} (its _no_split_modules "
                         f"names {sorted(names) or 'none'}); train it without --shard (DDP), or with --lora_rank")
    return layers


def shard_model(model):
    """fully_shard (FSDP2) on every decoder layer, then on the whole (embeddings, head): in place, each parameter
    becomes a DTensor holding this rank's rows. Forward and backward gather a layer just before it runs and free it
    after; gradients are reduce-scattered and averaged over the ranks, as DDP's are, so the loops run unchanged.
    bf16 weights keep their meaning through the existing fp32 masters: make_optimizer copies the shards, so each
    rank's masters and AdamW moments are its shard's (no MixedPrecisionPolicy: the weights are already bf16)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(next(model.parameters()).device.type, (WORLD,))
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def sharded(model):
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def gathered(state):
    """A state (dicts and lists of tensors) with every sharded tensor gathered whole onto the CPU, one at a time, for
    rank 0 to write (all ranks take part in each gather; the others get None). Unsharded tensors pass as they are, so
    a sharded run writes the files a single process writes, and either can resume the other's. The price of one
    simple file: a 7B's train_state.pt is ~100 GB through rank 0 (weights, fp32 masters, moments); --ckpt_every."""
    from torch.distributed.tensor import DTensor
    if isinstance(state, dict):
        return {k: gathered(v) for k, v in state.items()}
    if isinstance(state, list):
        return [gathered(v) for v in state]
    if isinstance(state, DTensor):
        whole = state.full_tensor()
        return whole.cpu() if RANK == 0 else None
    return state


def shard_like(tensor, like):
    """The inverse: a whole tensor cut to the shard `like` (a DTensor) holds on this rank; else the tensor, moved.
    Every rank read the same file, so each cuts its own rows (src_data_rank=None: nothing sent)."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(like, DTensor):
        return distribute_tensor(tensor.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)
    return tensor.to(like.device)


def load_weights(model, state):
    """model.load_state_dict from a whole state dict (best.pt, train_state.pt), sharded or not."""
    like = model.state_dict()
    model.load_state_dict({k: shard_like(v, like[k]) for k, v in state.items()})


@contextlib.contextmanager
def whole(model):
    """--shard: the weights gathered whole on every rank for the duration, so each rank can decode its own batches
    (different lengths, different numbers of forwards) with no collective in the way; sharded again after. Sampling
    a sharded model instead would re-gather every layer for every token: a 7B's 14 GB per decoded token."""
    from torch.distributed.fsdp import FSDPModule
    parts = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in parts:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in parts:
            m.reshard()
            if m is not model:  # the root's own weights (embeddings, head) stay whole from forward to backward
                m.set_reshard_after_forward(True, recurse=False)


# ---------------------------------------------------------------------------------------------------------------
# Files: whole files written under a temporary name and renamed; jsonl read line by line with line numbers.
# ---------------------------------------------------------------------------------------------------------------


class WriteFailed(OSError):
    """A write the run could not finish (a full disk, a quota, a vanished folder): cli prints it as one line."""


@contextlib.contextmanager
def writing(path):
    """Around every write of the run (whole files, cache appends, models, checkpoints): whatever the writer raises
    (OSError from Python, RuntimeError from torch.save or safetensors) becomes WriteFailed naming the file. Writes
    are atomic or appends, so what failed is never marked done and the same command redoes it."""
    try:
        yield
    except Exception as e:
        raise WriteFailed(getattr(e, "errno", None), getattr(e, "strerror", None) or f"{type(e).__name__}: {e}",
                          path) from e


def write_text(path, text):
    """A whole file, written to a temporary name and renamed: a crash leaves the old file or the new, never half."""
    if RANK == 0:
        with writing(path):
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
    sync()


def write_jsonl(path, rows, mode="w"):
    """Write rows whole (write_text), or append them and flush (a cache growing a batch at a time)."""
    if mode == "a":
        if RANK == 0:
            with writing(path):
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                with open(path, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)
                    f.flush()
        sync()
        return
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def numbered_jsonl(path, tolerant=False):
    """(line number, row) for each non-blank line. A cache (tolerant=True) drops a torn last line from a crash, and
    says so of any other bad line (a damaged file) before dropping it: its row is redone. User data must be clean:
    a bad line stops with its file and line number."""
    with open(path) as f:
        lines = f.readlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            if tolerant:
                if n < len(lines):
                    print(f"{path}, line {n}: not valid JSON ({e.msg}); the cache drops it and redoes its row")
                continue
            raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None


def read_jsonl(path, tolerant=False):
    return [row for _, row in numbered_jsonl(path, tolerant)]


def save_model(model, tok, path):
    model = merge_lora(model)
    weights = None
    if sharded(model):  # --shard: gathered whole for rank 0; a tied weight (embeddings = head) once, as transformers saves it
        weights, seen = {}, set()
        for k, v in model.state_dict(keep_vars=True).items():
            if id(v) not in seen:
                weights[k] = v.detach()
                seen.add(id(v))
        weights = gathered(weights)
    if RANK == 0:
        tmp = path + ".tmp"
        with writing(tmp):
            model.save_pretrained(tmp, state_dict=weights)
            tok.save_pretrained(tmp)
        with writing(path):
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
    sync()


# ---------------------------------------------------------------------------------------------------------------
# The answer checker's rules (is_equiv's helpers): normalising, parsing under a whitelist and a time bound, forms.
# ---------------------------------------------------------------------------------------------------------------


def _braced(text, start):
    """Content of the {...} group opening at text[start] == "{", nested braces matched; None if unclosed."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1:i]
    return None


def _normalize(s):
    """Surface clean-up before comparison: "\\$1,000.00" -> "1000.00", "90^\\circ" -> "90", "\\dfrac12" -> "\\frac{1}{2}"."""
    s = s.strip().replace("\\\\", "\n")  # a matrix row break; "\\ " would otherwise read as a spaced "\ "
    for a, b in [("−", "-"), ("π", "\\pi"), ("∞", "\\infty"), ("\\left", ""), ("\\right", ""), ("\\!", ""),
                 ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", " "), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"),
                 ("\\displaystyle", ""), ("\\$", ""), ("$", ""), ("^\\circ", ""), ("^{\\circ}", ""), ("°", ""),
                 ("\\mathrm{", "\\text{"), ("\\textbf{", "\\text{"), ("\\mbox{", "\\text{"), ("\\textnormal{", "\\text{"),
                 ("\\cfrac", "\\frac"), ("\\dbinom", "\\binom"), ("\\tbinom", "\\binom"), ("{,}", ","),
                 ("\\leq", "<="), ("\\geq", ">="), ("\\le", "<="), ("\\ge", ">="), ("\\lt", "<"), ("\\gt", ">"),
                 ("\\neq", "!="), ("\\ne", "!="), ("\\lbrace", "\\{"), ("\\rbrace", "\\}"), ("\\mp", "\\pm"),
                 ("±", "\\pm"), ("+/-", "\\pm")]:
        s = s.replace(a, b)
    # a unit in \text after a value, at the end or before a list's comma: "\frac{2}{5}\text{ kg}" -> "\frac{2}{5}"
    s = re.sub(r"(?<=[\d}).])\s*\\text\{\s*[a-zA-Z][a-zA-Z. ]*\}(\^\{?\d\}?)?(?=\s*(?:,|\\\}|$))", "", s)
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r" \1", s).strip()
    s = re.sub(r"^(-?[\d.]+)\s*(\\times|\\cdot)\s*10\^\{?(-?\d+)\}?$", r"\1e\3", s)  # "1.5 \times 10^{3}" -> "1.5e3"
    s = re.sub(r"\s*(degrees?|percent|dollars?|units?|cents?)\s*$", "", s)
    s = re.sub(r"\\(frac|sqrt)\s*(\w)(\w)?", lambda m: f"\\{m[1]}{{{m[2]}}}" + (f"{{{m[3]}}}" if m[3] else ""), s)
    s = re.sub(r"\\frac(\{(?:[^{}]|\{[^{}]*\})*\})\s*(\w)", r"\\frac\1{\2}", s)    # "\frac{270}7" (MATH's) -> "\frac{270}{7}"
    s = re.sub(r"\\frac\s*(\w)\{", r"\\frac{\1}{", s)                 # "\frac1{x}" -> "\frac{1}{x}"
    s = re.sub(r"_\{(\w+)\}", r"_\1", s)                         # "101_{2}" -> "101_2"
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s.replace(" ", "")) or \
            re.fullmatch(r"-?\d{1,3}([ \u2009\u202f]\d{3})+(\.\d+)?", s):
        s = re.sub(r"[, \u2009\u202f]", "", s)                 # thousands separators: 12,500  12 500  12{,}500
    m = re.fullmatch(r"(-?)(\d*)\.(\d*)\\overline\{(\d+)\}", s)
    if m:                                                      # 0.1\overline{6} -> 1/6, exactly
        sign, whole, fixed, rep = m.groups()
        value = (int(whole or 0) + (Fraction(int(fixed or 0)) + Fraction(int(rep), 10 ** len(rep) - 1)) /
                 10 ** len(fixed))
        s = sign + f"{value.numerator}/{value.denominator}"
    return _drop_unit(s.strip().rstrip(".").strip())


_UNIT = r"(?:\s+[a-zA-Z]+)*(?:\^\{?\d\}?)?"
_FRACTION = r"-?\d*\s*\\frac\{[^{}]*\}\{[^{}]*\}|-?\d+\s*/\s*\d+"


def _drop_unit(s):
    """A number and a word after it -> the number: "18 apples", "5 cm^2" -> "18", "5". After a fraction only a unit-like
    word goes: "\\frac{2}{5} kg", "2/5 cups" -> the fraction, but "\\frac{1}{2} x" and "\\frac12 bh" stay expressions."""
    m = re.fullmatch(r"([-+]?\s*[\d.]+)\s+[a-zA-Z]+" + _UNIT, s) or re.fullmatch(
        rf"({_FRACTION})\s+(?:[a-zA-Z]{{4,}}|kg|cm|mm|km|ml|mg|ft|oz|lbs?|yds?|mi|hrs?|min|sec|day|mph|in){_UNIT}", s)
    return m.group(1).strip() if m else s


def _matrix(s):
    """Normalised "\\begin{pmatrix} 1 & 2 \\n 3 & 4 \\end{pmatrix}" -> [["1", "2"], ["3", "4"]]; None if not one."""
    s = re.sub(r"^[(\[]\s*(\\begin\{(?:array\}\{[lcr|]*|[pbvB]?matrix)\}.*\\end\{(?:array|[pbvB]?matrix)\})\s*[)\]]$", r"\1",
               s.strip(), flags=re.S)                         # [array], (pmatrix): the brackets are the matrix's
    s = re.sub(r"^\\begin\{array\}\{[lcr|]*\}(.*)\\end\{array\}$", r"\\begin{matrix}\1\\end{matrix}", s, flags=re.S)
    m = re.fullmatch(r"\\begin\{[pbvB]?matrix\}(.*)\\end\{[pbvB]?matrix\}", s.strip(), re.S)
    if not m:
        return None
    return [[c.strip() for c in row.split("&")] for row in m.group(1).split("\n") if row.strip()]


_NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d{1,3})?")


_SAFE_NAMES = {"sqrt", "pi", "oo", "sin", "cos", "tan", "csc", "sec", "cot", "log", "exp", "factorial", "binomial"}


def _latex_to_sympy(s):
    """A whitelisted translation of a LaTeX-ish answer to sympy syntax, or None when it is not plainly math.
    "\\frac{\\sqrt{3}}{2}" -> "((sqrt((3))))/((2))"     "2^{10}" -> "2**(10)"     "import os" -> None"""
    if len(s) > 200:
        return None
    for _ in range(20):  # innermost-first rewriting of \frac{a}{b} and \sqrt{a}; bounded
        m = re.search(r"\\(frac|binom)\{([^{}]*)\}\{([^{}]*)\}", s)
        if m:  # \frac{a}{b} -> ((a)/(b)),  \binom{n}{k} -> binomial((n),(k))
            s = s[:m.start()] + (f"(({m[2]})/({m[3]}))" if m[1] == "frac" else f"binomial(({m[2]}),({m[3]}))") + s[m.end():]
            continue
        m = re.search(r"\\sqrt\[([^{}\[\]]*)\]\{([^{}]*)\}", s)
        if m:  # \sqrt[n]{a} -> ((a)**(1/(n)))
            s = s[:m.start()] + f"(({m[2]})**(1/({m[1]})))" + s[m.end():]
            continue
        m = re.search(r"\\sqrt\{([^{}]*)\}", s)
        if not m:
            break
        s = s[:m.start()] + f"(sqrt(({m[1]})))" + s[m.end():]
    for a, b in [("\\cdot", "*"), ("\\times", "*"), ("\\div", "/"), ("\\pi", "pi"), ("\\infty", "oo"), ("^", "**"),
                 ("{", "("), ("}", ")"), ("\\sin", "sin"), ("\\cos", "cos"), ("\\tan", "tan"), ("\\ln", "log"),
                 ("\\log", "log"), ("\\exp", "exp"), ("\\csc", "csc"), ("\\sec", "sec"), ("\\cot", "cot")]:
        s = s.replace(a, b)
    if re.search(r"[\d+\-*/]", s):  # in an expression, "ab" is a times b (a bare word stays a word: "yes" != "y e s")
        s = re.sub(r"(?<![a-zA-Z])[a-zA-Z]{2,3}(?![a-zA-Z])", lambda m: m[0] if m[0] in _SAFE_NAMES else "*".join(m[0]), s)
    if re.search(r"!\s*!|\)\s*!|\d{4,}\s*!", s):
        return None                                         # 100!!!, (n)!, 5000!: towers and giants, refused
    s = re.sub(r"(\d+)\s*!", r"factorial(\1)", s)           # 4! -> factorial(4)
    if "binomial" in s and re.search(r"\d{5,}", s):
        return None                                         # \binom{999999999}{500000}: too big to evaluate in time
    if not re.fullmatch(r"[0-9a-zA-Z+\-*/().,\s]*", s) or not s.strip() or ("," in s and "binomial" not in s):
        return None
    if any(len(w) > 1 and w not in _SAFE_NAMES for w in re.findall(r"[a-zA-Z]+", s)):
        return None                                         # only single-letter symbols and known functions
    if re.search(r"\*\*\s*\([^()]*\*\*|\*\*\s*\(?[^()+\-*/]*\)?\s*\*\*", s):
        return None                                         # a power in an exponent (towers): too big to evaluate
    if s.count("**") > 2 or any(len(d) > 40 for d in re.findall(r"\d+", s)):
        return None                                         # 9^9^9^9 and 10^(huge) never reach sympy
    if any(abs(int(e)) > 300 for e in re.findall(r"\*\*\s*\(?\s*-?(\d{1,40})", s)):
        return None
    return s


class _Timeout(Exception):
    pass


def _with_time_limit(seconds, fn, *args):
    """Run fn under a wall-clock bound (SIGALRM, main thread only); other threads rely on _latex_to_sympy's caps."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        return fn(*args)

    def on_alarm(*_):
        raise _Timeout()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _parse(text):
    """Whitelisted sympy syntax (from _latex_to_sympy) -> a sympy expression. Call under _with_time_limit."""
    # imported by the caller first, outside the time limit: an import cut short by the alarm would leave sympy
    # half-initialised for the rest of the run
    import sympy
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations, rationalize, \
        implicit_multiplication_application
    # rationalize: decimals become exact rationals, so 0.333 != 1/3 while 0.5 == 1/2.
    tr = standard_transformations + (implicit_multiplication_application, rationalize)
    # every single letter is a plain Symbol (so "N", "S", "O" never reach sympy's functions of those names),
    # except e and i, which MATH answers use for Euler's number and the imaginary unit
    names = {c: sympy.Symbol(c) for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"}
    names.update({"e": sympy.E, "i": sympy.I, "sqrt": sympy.sqrt, "pi": sympy.pi, "oo": sympy.oo, "sin": sympy.sin,
                  "cos": sympy.cos, "tan": sympy.tan, "log": sympy.log, "exp": sympy.exp, "factorial": sympy.factorial,
                  "binomial": sympy.binomial, "csc": sympy.csc, "sec": sympy.sec, "cot": sympy.cot})
    return parse_expr(text, local_dict=names, transformations=tr, evaluate=True)


def _sympy_equal(a, b):
    import sympy
    return sympy.simplify(_parse(a) - _parse(b)) == 0


def _rounds_to(exact, decimal):
    """Does the exact value (sympy syntax) round, half away from zero, to this decimal at its own precision?
    ("2/3", "0.666667") -> True; ("2/3", "0.666666") -> False (truncated, not rounded)"""
    from decimal import Decimal, ROUND_HALF_UP
    value = _parse(exact).evalf(40)
    if not value.is_real or not value.is_finite:
        return False
    d = Decimal(decimal)
    return Decimal(str(value)).quantize(d, rounding=ROUND_HALF_UP) == d


def _split_top(s):
    """Split on commas outside brackets: "(1,2), 3" -> ["(1,2)", "3"]."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _mixed_number(s):
    """"2\\frac{1}{2}" or "2 1/2" -> "5/2"; anything else unchanged."""
    m = re.fullmatch(r"(-?\d+)\s*\\frac\{(\d+)\}\{(\d+)\}|(-?\d+)\s+(\d+)/(\d+)", s)
    if not m:
        return s
    w, n, d = [int(g) for g in m.groups() if g is not None]
    return str(Fraction(w) + (Fraction(n, d) if w >= 0 else -Fraction(n, d))) if d else s


def _equal_scalar(a, b):
    if a == b:
        return True
    if _NUMBER.fullmatch(a) and _NUMBER.fullmatch(b):       # the fast path every toy answer takes
        return Fraction(a) == Fraction(b)
    a, b = _mixed_number(a), _mixed_number(b)
    sa, sb = _latex_to_sympy(a), _latex_to_sympy(b)
    if sa is None or sb is None:
        return a.lower().replace(" ", "") == b.lower().replace(" ", "")
    importlib.import_module("sympy.parsing.sympy_parser")  # slow the first time: outside the limit (_sympy_equal)
    try:
        for x, y in ((a, sb), (b, sa)):  # a decimal of 6+ significant digits equals the exact value it rounds to
            if _NUMBER.fullmatch(x) and "." in x and len(x.replace("-", "").replace(".", "").lstrip("0")) >= 6:
                return _with_time_limit(0.5, _rounds_to, y, x)
        return bool(_with_time_limit(0.5, _sympy_equal, sa, sb))
    except Exception:  # _Timeout, sympy's SyntaxError/TypeError/...: a malformed answer is simply not equal
        return a.replace(" ", "") == b.replace(" ", "")


def _equal_structured(a, b):
    """Compare normalised answers: matrices cell by cell, unions of intervals piece by piece, tuples and intervals
    in order with matching brackets, sets and bare lists as multisets, anything else as one expression."""
    ma, mb = _matrix(a), _matrix(b)
    if ma is not None or mb is not None:
        return ma is not None and mb is not None and [len(r) for r in ma] == [len(r) for r in mb] and \
            all(_equal_scalar(x, y) for ra, rb in zip(ma, mb) for x, y in zip(ra, rb))
    if "\\cup" in a or "\\cup" in b:
        xs, ys = a.split("\\cup"), b.split("\\cup")
        return len(xs) == len(ys) and all(_equal_structured(x.strip(), y.strip()) for x, y in zip(xs, ys))
    brackets = ("()", "[]", "(]", "[)")
    if (a[:1] + a[-1:] in brackets and len(_split_top(a)) == 1) or (b[:1] + b[-1:] in brackets and len(_split_top(b)) == 1):
        xs, ys = _split_top(a[1:-1]), _split_top(b[1:-1])
        if len(xs) > 1 or len(ys) > 1:                      # tuples and intervals: in order, brackets must match
            return a[:1] + a[-1:] == b[:1] + b[-1:] and len(xs) == len(ys) and \
                all(_equal_scalar(x.strip(), y.strip()) for x, y in zip(xs, ys))
    if a.startswith("\\{") and a.endswith("\\}"):             # a set: its elements, in any order
        a = a[2:-2]
    if b.startswith("\\{") and b.endswith("\\}"):
        b = b[2:-2]
    xs, ys = [x.strip() for x in _split_top(a)], [y.strip() for y in _split_top(b)]
    if len(xs) > 1 or len(ys) > 1:                          # unordered lists, e.g. the roots of a polynomial
        if all(x[:1] + x[-1:] in brackets for x in xs + ys):  # a list of tuples: each counted once
            xs, ys = list(dict.fromkeys(x.replace(" ", "") for x in xs)), list(dict.fromkeys(y.replace(" ", "") for y in ys))
        if len(xs) != len(ys):
            return False
        left = list(ys)
        for x in xs:
            hit = next((i for i, y in enumerate(left) if _equal_structured(x, y)), None)
            if hit is None:
                return False
            left.pop(hit)
        return True
    return _equal_scalar(a, b)


_RELATION = re.compile(r"<=|>=|!=|<|>|=")


def _relation(s):
    """"y = 2x + 1" -> ("=", "(2x + 1)-(y)"); "x > 2" -> ("<", "(x)-(2)") (> and >= turned round); else None."""
    parts = _RELATION.split(s)
    if len(parts) != 2 or len(_split_top(s)) > 1:
        return None
    op = _RELATION.search(s)[0]
    left, right = (parts[1], parts[0]) if op in (">", ">=") else (parts[0], parts[1])
    sl, sr = _latex_to_sympy(left.strip()), _latex_to_sympy(right.strip())
    return None if sl is None or sr is None else ({">": "<", ">=": "<="}.get(op, op), f"({sr})-({sl})")


def _sympy_ratio(a, b):
    import sympy
    x, y = (_parse(t) for t in (a, b))
    if not x.free_symbols or not y.free_symbols:
        return None
    r = sympy.simplify(x / y)
    return r if not r.free_symbols and r.is_number and r != 0 else None


def _equal_relation(a, b):
    """Two equations with the same solution set up to scaling (y = 2x + 1 ~ 4x - 2y + 2 = 0), or two inequalities up to
    turning round and positive scaling (x < 2 ~ 2 > x ~ -x > -2): (R - L) / (R' - L') is a constant, positive for <."""
    ra, rb = _relation(a), _relation(b)
    if ra is None or rb is None or ra[0] != rb[0]:
        return False
    importlib.import_module("sympy.parsing.sympy_parser")
    try:
        r = _with_time_limit(0.5, _sympy_ratio, ra[1], rb[1])
    except Exception:
        return False
    return r is not None and (ra[0] in ("=", "!=") or bool(r > 0))


def _as_interval(s):
    """An answer that describes an interval of one variable, as the interval: "0 <= t <= 4" -> "[0, 4]",
    "x > 2" -> "(2, \\infty)", "x \\in (0, 1]" -> "(0, 1]"; else None."""
    m = re.fullmatch(r"[a-zA-Z]\s*\\in\s*(.+)", s)
    if m:
        return m[1].strip()
    m = re.fullmatch(r"([^<>=]+?)\s*(<=|<)\s*[a-zA-Z]\s*(<=|<)\s*([^<>=]+)", s)
    if m:
        return f"{'[' if m[2] == '<=' else '('}{m[1].strip()}, {m[4].strip()}{']' if m[3] == '<=' else ')'}"
    m = re.fullmatch(r"[a-zA-Z]\s*(<=|>=|<|>)\s*([^<>=]+)|([^<>=]+?)\s*(<=|>=|<|>)\s*[a-zA-Z]", s)
    if not m:
        return None
    op, v = (m[1], m[2]) if m[1] else ({"<": ">", ">": "<", "<=": ">=", ">=": "<="}[m[4]], m[3])
    v = v.strip()
    return {"<": f"(-\\infty, {v})", "<=": f"(-\\infty, {v}]", ">": f"({v}, \\infty)", ">=": f"[{v}, \\infty)"}[op]


# what may label a value: x, b_1, f(2), |PQ|, (a, b), \\theta, and the names of segments and angles: PQ, \\overline{AB},
# \\angle ABC, m\\angle A (capitals only: "xy = 6" is an equation, not a label)
_LABEL = re.compile(r"(\|[^|]*\||\([a-zA-Z_\d\s,]*\)|[a-zA-Z](?:_\w+)?(?:\([^()]*\))?|[A-Z]{2,4}|\\overline\{[A-Z]{2}\}|"
                    r"(?:m\s*)?\\angle\s*[A-Z]{1,3}|\\[a-z]+)\s*(?:=|\\in)\s*(.+)")


def _listed(a, b):
    """Both answers as comparable lists: separators (; and or \\quad) as commas, a \\pm as its two values, labels
    dropped ("x = 3, x = -4" -> "3, -4"; "(a, b) = (4, 1)" -> "(4, 1)"), unless both sides label several parts:
    then the labels are compared too ("b_1 = 6, b_10 = 2" ~ "b_10 = 2, b_1 = 6", not "b_1 = 2, b_10 = 6")."""
    out = []
    for s in (a, b):
        s = re.sub(r"\s*(?:\\q?quad|;|\band\b|\bor\b)\s*", ", ", s).strip(", ")
        if s.startswith("\\{") and s.endswith("\\}"):
            s = s[2:-2]
        parts = []
        for p in (_drop_unit(x.strip()) for x in _split_top(s)):
            parts += [p.replace("\\pm", "+"), p.replace("\\pm", "-")] if p.count("\\pm") == 1 else [p]
        out.append([(m[1].replace(" ", ""), m[2]) if m else (None, p) for m, p in ((_LABEL.fullmatch(p), p) for p in parts)])
    labels = [[label for label, _ in x] for x in out]
    if all(len(ls) > 1 and all(ls) and len(set(ls)) == len(ls) for ls in labels):  # b_1 = 6, b_10 = 2: by label
        if sorted(labels[0]) != sorted(labels[1]):
            return ["labels"], ["differ"]
        return [["(" + ", ".join(v for _, v in sorted(x)) + ")"] for x in out]
    return [[value for _, value in x] for x in out]


# ---------------------------------------------------------------------------------------------------------------
# Devices and LoRA (Hu et al. 2021): plain-PyTorch low-rank adapters, merged on save.
# ---------------------------------------------------------------------------------------------------------------


def pick_device(cfg):
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


class LoRALinear(torch.nn.Module):
    """y = W x + (alpha / r) B A x, with W frozen and only A (r x in) and B (out x r) trained. B starts at zero, so
    the model starts exactly as the one it wraps: the reference log-probs taken before training are pi_sft's."""

    def __init__(self, base, rank, alpha=16.0):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype,
                                                device=base.weight.device) / base.in_features ** 0.5)
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                                device=base.weight.device))

    def forward(self, x):
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale


def add_lora(model, rank):
    """Freeze every weight; wrap the attention and MLP projections (q/k/v/o, gate/up/down) in adapters."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in list(model.named_modules()):
        for child, layer in list(module.named_children()):
            if child.endswith("_proj") and isinstance(layer, torch.nn.Linear):
                setattr(module, child, LoRALinear(layer, rank))
    return model


def merge_lora(model):
    """Fold each adapter into its weight (W += scale B A) and unwrap it: a plain model for save_pretrained."""
    for name, module in list(model.named_modules()):
        for child, layer in list(module.named_children()):
            if isinstance(layer, LoRALinear):
                with torch.no_grad():
                    layer.base.weight += (layer.B @ layer.A) * layer.scale
                setattr(module, child, layer.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


# ---------------------------------------------------------------------------------------------------------------
# The sampler's internals and the resumable generation cache (batches keyed, seeded and fingerprinted).
# ---------------------------------------------------------------------------------------------------------------


def left_pad(rows, pad, device):
    """[[5, 6, 7], [8]] -> ids [[5, 6, 7], [pad, pad, 8]] and attention [[1, 1, 1], [0, 0, 1]]: every prompt ends at
    the same position, so the next token of every row is predicted from the last column."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows], device=device)                    # (B, T)
    att = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows], device=device)           # (B, T)
    return ids, att


class RoomyLayer(DynamicLayer):
    """A KV-cache layer with room reserved for the tokens still to come: a decode step writes its keys and values in
    place. (transformers' DynamicLayer appends with torch.cat, copying the whole cache every step: a third of all
    decode time on the CPU default.) keys/values are views of the first n positions of the buffers."""

    @classmethod
    def reserve(cls, layer, index, extra):
        new = cls()
        _, H, T, D = layer.keys.shape
        new.buffers = [torch.empty(len(index), H, T + extra, D, dtype=x.dtype, device=x.device)
                       for x in (layer.keys, layer.values)]
        new.buffers[0][:, :, :T], new.buffers[1][:, :, :T] = layer.keys[index], layer.values[index]
        new.dtype, new.device, new.is_initialized, new.n = layer.keys.dtype, layer.keys.device, True, T
        new.keys, new.values = new.buffers[0][:, :, :T], new.buffers[1][:, :, :T]
        return new

    def update(self, key_states, value_states, *args, **kwargs):
        t = key_states.shape[-2]
        self.buffers[0][:, :, self.n:self.n + t], self.buffers[1][:, :, self.n:self.n + t] = key_states, value_states
        self.n += t
        self.keys, self.values = self.buffers[0][:, :, :self.n], self.buffers[1][:, :, :self.n]
        return self.keys, self.values

    def batch_select_indices(self, indices):
        self.buffers = [b[indices] for b in self.buffers]
        self.keys, self.values = self.buffers[0][:, :, :self.n], self.buffers[1][:, :, :self.n]


def roomy(cache, index, extra):
    """The prefill's cache with its row index[i] as row i, and room for `extra` more tokens per layer when every layer
    is a plain DynamicLayer (sliding-window or hybrid models keep their own layers, re-indexed)."""
    if all(type(layer) is DynamicLayer and layer.is_initialized for layer in getattr(cache, "layers", [None])):
        cache.layers = [RoomyLayer.reserve(layer, index, extra) for layer in cache.layers]
    else:
        cache.batch_select_indices(index)
    return cache


_NEWLINE_IDS = {}


def newline_ids(tok):
    """The ids of every token whose text holds a newline (where an answer line can finish), worked out once."""
    if id(tok) not in _NEWLINE_IDS:  # (the tokenizer is kept with its ids, so its id() cannot be reused)
        texts = tok.batch_decode([[i] for i in range(len(tok))])
        _NEWLINE_IDS[id(tok)] = (tok, frozenset(i for i, t in enumerate(texts) if "\n" in t))
    return _NEWLINE_IDS[id(tok)][1]


CACHE_VERSION = 2  # bump when a change to the code changes what generation produces for the same inputs


def model_fingerprint(model):
    """A cheap identity of the weights (the first values of every tensor): caches made by other weights are not reused."""
    if model is None:
        return "none"
    h = hashlib.sha1()
    for p in model.parameters():
        h.update(p.detach().flatten()[:1024].float().cpu().clone().numpy().tobytes())  # a copy: numpy() pins storage
    return h.hexdigest()[:16]


def gen_batches(model, tok, rows, cfg):
    """Consecutive rows, cut into batches of at most --gen_batch rows and, with a token budget, at most that many
    tokens of KV cache (rows x (longest prompt + max_new_tokens)): long rollout prefixes get smaller batches."""
    budget = cfg.gen_tokens
    if not budget and model is not None and next(model.parameters()).device.type == "cuda":
        mc = model.config
        heads = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
        per_token = 2 * mc.num_hidden_layers * heads * (getattr(mc, "head_dim", None) or mc.hidden_size //
                                                        mc.num_attention_heads) * next(model.parameters()).element_size()
        # keys and values of every layer in half the free memory (which varies: a fixed --gen_tokens keeps the
        # batches, so a resumed run's cached rows, the same from run to run)
        budget = min(gather([int(0.5 * torch.cuda.mem_get_info()[0] / per_token)]))  # ranks must cut alike
    if not budget:
        return [rows[i:i + cfg.gen_batch] for i in range(0, len(rows), cfg.gen_batch)]
    batches, longest = [[]], 0
    for row, n in zip(rows, (len(ids) for ids in tok([p for _, p in rows])["input_ids"])):
        longest = max(longest, n)
        if batches[-1] and (len(batches[-1]) == cfg.gen_batch or
                            (len(batches[-1]) + 1) * (longest + cfg.max_new_tokens) > budget):
            batches.append([])
            longest = n
        batches[-1].append(row)
    return batches


def cached_generate(model, tok, rows, cfg, path, seed, desc, temperature=None):
    """Generate for many rows [(key, prompt)] in batches of cfg.gen_batch, appending each finished batch to `path`
    ({"key", "text", "tokens", "batch", "tag"} per row). A restarted run skips the batches already on disk; batch b
    always gets the same rows and seed, so a resumed run produces exactly what an uninterrupted one would. A row is
    reused only if its tag (weights, prompt, sampling settings, seed, code version) matches: never a stale row.
    -> ({key: text}, {"tokens": generated for these rows, "new_tokens" and "seconds": the part done now})"""
    temperature = cfg.temperature if temperature is None else temperature
    weights = model_fingerprint(model)

    def tag(prompt, b):  # what produced a row: a cached row is reused only if all of this is unchanged
        what = [CACHE_VERSION, weights, prompt, temperature, cfg.max_new_tokens, seed * 100003 + b]
        return hashlib.sha1(json.dumps(what).encode()).hexdigest()[:16]
    done = {}
    if os.path.exists(path):
        cached = read_jsonl(path, tolerant=True)
        with open(path, "rb") as f:
            torn = f.seek(0, 2) > 0 and (f.seek(-1, 2) or f.read(1)) != b"\n"
            bad = sum(1 for line in (f.seek(0) or f) if line.strip()) != len(cached)
        if torn or bad:  # a crash mid-write, or a damaged line: keep the whole rows, so new batches append after them
            write_jsonl(path, cached)
        done = {r["key"]: r for r in cached}
    batches = gen_batches(model, tok, rows, cfg)
    todo = [b for b, batch in enumerate(batches)
            if not all(k in done and done[k].get("tag") == tag(p, b) for k, p in batch)]
    new_tokens, read_tokens, t0 = 0, 0, time.time()
    for first in tqdm(range(0, len(todo), WORLD), desc=desc, leave=False):  # a round: each rank samples one batch
        fresh = []
        if first + RANK < len(todo):
            b = todo[first + RANK]
            texts, n, read = generate(model, tok, [p for _, p in batches[b]], temperature, cfg.max_new_tokens,
                                      seed * 100003 + b)
            fresh = [{"key": k, "text": t, "tokens": m, "batch": b, "tag": tag(p, b)}
                     for (k, p), t, m in zip(batches[b], texts, n)]
            new_tokens, read_tokens = new_tokens + sum(n), read_tokens + read
        fresh = gather(fresh)
        write_jsonl(path, fresh, mode="a")
        done.update({r["key"]: r for r in fresh})
    new_tokens, read_tokens = (sum(gather([x])) for x in (new_tokens, read_tokens))
    stats = {"tokens": sum(done[k]["tokens"] for k, _ in rows), "new_tokens": new_tokens,
             "seconds": time.time() - t0}
    if new_tokens and model is not None:  # model FLOPs: 2 N per token, prompts read once each plus the tokens written
        sp = speed(model, new_tokens, 2 * (read_tokens + new_tokens) / new_tokens, stats["seconds"])
        tqdm.write(f"  {desc}: {new_tokens} tokens in {stats['seconds']:.1f} s, {sp['tokens_per_s']} tokens/s, "
                   f"MFU {sp['mfu']:.1%}, peak memory {sp['peak_gib']} GiB")
        stats.update(sp)
    return {k: done[k]["text"] for k, _ in rows}, stats


# ---------------------------------------------------------------------------------------------------------------
# Training machinery: the optimizer (AdamW, fp32 masters), checkpoints that resume exactly, --val's best
# checkpoint, memory estimates, tokens/s and MFU, a non-finite stop.
# ---------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def matmul_peak(device, dtype):
    """FLOP/s of one big square matmul on this device, timed once: the denominator of every MFU printed (a measured
    peak, not a datasheet one, so a CPU run gets a meaningful figure too)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for reps in (1, 8):  # the first pass warms up
        torch.cuda.synchronize() if device.type == "cuda" else None
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize() if device.type == "cuda" else None
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def speed(model, tokens, flops_per_token, seconds):
    """tokens/s, model-FLOP utilisation (flops_per_token x N x tokens, N = the weights matmuls use; tokens of all
    ranks, against all ranks' peak), and this process's peak memory."""
    p = next(model.parameters())
    n = sum(q.numel() for q in model.parameters()) - (0 if getattr(model.config, "tie_word_embeddings", False) else
                                                         model.get_input_embeddings().weight.numel())
    if p.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:  # the process's peak resident memory (KiB on Linux)
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    seconds = max(seconds, 1e-9)
    return {"tokens_per_s": round(tokens / seconds), "peak_gib": round(peak, 2),
            "mfu": round(flops_per_token * n * tokens / seconds / matmul_peak(p.device, p.dtype) / WORLD, 4)}


def check_finite(loss, stage):
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{stage}: the loss became {loss.item()}; lower the learning rate (--lr/--dpo_lr)")


def save_train_state(path, model, opt, sched, step, extra):
    """Everything a killed training run needs to go on exactly where it stopped, written under a temporary name
    and renamed, so a crash mid-write leaves the previous checkpoint intact."""
    state = gathered({"model": model.state_dict(), "opt": opt.state_dict(), "masters": [m for _, m in opt.masters]})
    if RANK == 0:
        with writing(path):
            torch.save({**state, "sched": sched.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
                        "extra": extra}, path + ".tmp")
            os.replace(path + ".tmp", path)
    sync()


def train_fingerprint(cfg, desc, lr, data):
    """What a training run is made by (its result settings, stage, learning rate, data): a checkpoint records it, so
    one copied in from another run is refused rather than resumed. The data enter by size and ends (cheap on 7B data)."""
    what = [{k: getattr(cfg, k) for k in RESULT_KEYS}, desc, lr, len(data), data[:1], data[-1:]]
    return hashlib.sha1(json.dumps(what, default=str).encode()).hexdigest()[:16]


def load_train_state(path, model, opt, sched, extra):
    """-> the step to resume after (0 = fresh start); restores model, optimizer, scheduler, RNG and `extra`. A state
    whose extra["made_by"] (train_fingerprint) differs from this run's came from other settings or data: refused."""
    if not path or not os.path.exists(path):
        return 0
    try:  # a torn, damaged or foreign checkpoint (another model's, copied in) is refused here, never half-loaded
        state = torch.load(path, weights_only=False, map_location="cpu", mmap=True)  # mmap: ranks share the pages
        if state["extra"].get("made_by") != extra.get("made_by"):
            raise ValueError("it was made with other settings or data")
        load_weights(model, state["model"])
        params = [p for g in opt.param_groups for p in g["params"]]  # AdamW's moments are shaped as their weight
        state["opt"]["state"] = {i: {k: shard_like(v, params[i]) if v.dim() else v for k, v in st.items()}
                                 for i, st in state["opt"]["state"].items()}
        opt.load_state_dict(state["opt"])
    except Exception as e:
        why = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)[:200]
        raise SystemExit(f"error: {path}: a training checkpoint this run cannot resume from ({why}); remove it to "
                         f"train the stage from its start: rm {path}") from None
    with torch.no_grad():  # the fp32 masters carry the bits that the bf16 weights rounded off
        for (p, m), saved in zip(opt.masters, state.get("masters") or [p for p, _ in opt.masters]):
            m.copy_(shard_like(saved, m))
    sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["torch_rng"])
    extra.update(state["extra"])
    print(f"resuming {path} after step {state['step']}")
    return state["step"]


def memory_estimate(model, rows, seq, grad_ckpt, shards=1):
    """GiB per process for weights, gradients, AdamW's two fp32 moments (plus the fp32 masters of bf16 weights:
    make_optimizer) and the activations of one forward of `rows` sequences. Activations per layer follow Korthikanti
    et al. 2022: s b h (34 + 5 a s / h) bytes in 16-bit (2 s b h kept with checkpointing), plus the fp32 logits and
    their log-softmax (2 x 4 b s V bytes). Sharded over `shards` processes (--shard), the first three are split, and
    what is gathered whole at a time is added: the root's weights (embeddings, head) and two layers' (one computing,
    the next prefetched), each with its gradient in the backward."""
    mc, size = model.config, next(model.parameters()).element_size()
    h, a, L, V = mc.hidden_size, mc.num_attention_heads, mc.num_hidden_layers, mc.vocab_size
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_layer = seq * rows * h * (2 if grad_ckpt else 34 + 5 * a * seq / h) * size / 2
    gib = {"weights": total * size / shards, "gradients": trained * size / shards,
           "optimizer": trained * (8 if size == 4 else 12) / shards}
    if shards > 1:
        layer = sum(p.numel() for p in decoder_layers(model)[0].parameters())
        gib["gathered"] = 2 * (total - L * layer + 2 * layer) * size
    gib["activations"] = L * per_layer + 8 * rows * seq * V
    return {k: round(v / 2 ** 30, 3) for k, v in gib.items()}


def train_flops(cfg):
    """Model FLOPs per token and weight for a training step: 2 forward + 4 backward, the last 2 of them (weight
    gradients) skipped for frozen weights under LoRA."""
    return 4 if cfg.lora_rank else 6


def memory_line(model, cfg, desc, per_example=1):
    """What a training stage prints before it starts: memory_estimate per process, for a forward of this rank's share
    of a micro-batch, per_example sequences each (DPO: chosen and rejected)."""
    rows, shards = min(cfg.micro_batch or cfg.batch_size, math.ceil(cfg.batch_size / WORLD)), WORLD if cfg.shard else 1
    est = memory_estimate(model, rows * per_example, cfg.max_len, cfg.grad_ckpt, shards)
    return (f"{desc}: memory estimate per process (GiB, {rows * per_example} sequences x {cfg.max_len} tokens at most"
            + (f", sharded over {shards}" if shards > 1 else "") + "): "
            + ", ".join(f"{k} {v}" for k, v in est.items()) + f", total {sum(est.values()):.3f}")


def prepare_training(model, cfg, desc, per_example=1):
    """Adapters (--lora_rank) and activation checkpointing (--grad_ckpt), train mode, the memory this needs (printed).
    Under torchrun: DDP, or with --shard the model sharded in place (shard_model). -> what to run forwards through."""
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank)
    if cfg.grad_ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    print(memory_line(model, cfg, desc, per_example))
    if WORLD == 1:
        return model
    if cfg.shard:
        return shard_model(model)
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model)  # forwards through it; its backward averages gradients over the ranks


def branched_logps(model, tok, enc_pairs, cfg, device):
    """dpo_logps for pairs that share a long prompt (per-step pairs: question + solution prefix) and differ in a short
    step: the prompt is read once; chosen runs from its KV cache, the cache is cut back to the prompt, rejected runs
    from it; gradients flow through the cache into the prompt. Instead of two full forwards over mostly the same
    tokens, and each side padded only to its own longest (a rejected step is short). Same values (tested)."""
    prompts, pad = [c[0] for c, _ in enc_pairs], tok.pad_token_id
    p_ids, p_att = left_pad(prompts, pad, device)                                                  # (B, Tp)
    out = model(input_ids=p_ids, attention_mask=p_att, position_ids=(p_att.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    cache, first = out.past_key_values, out.logits[:, -1:]  # (B, 1, V): predicts each response's first token
    logps = []
    for side in (0, 1):  # chosen, then rejected
        responses = [pair[side][1][:max(0, cfg.max_len - len(pair[side][0]))] for pair in enc_pairs]
        Tr = max(1, max(map(len, responses)))
        r_ids = torch.tensor([r + [pad] * (Tr - len(r)) for r in responses], device=device)        # (B, Tr)
        r_att = torch.tensor([[1] * len(r) + [0] * (Tr - len(r)) for r in responses], device=device)
        logits = model(input_ids=r_ids, attention_mask=torch.cat([p_att, r_att], 1), past_key_values=cache,
                       position_ids=p_att.sum(-1, keepdim=True) + torch.arange(Tr, device=device),
                       use_cache=True).logits                                                      # (B, Tr, V)
        cache.crop(-Tr)                                                   # back to the prompt for the other side
        logits = torch.cat([first, logits[:, :-1]], 1).float()           # (B, Tr, V): what predicts each token
        tok_logp = torch.log_softmax(logits, -1).gather(-1, r_ids.unsqueeze(-1)).squeeze(-1)      # (B, Tr)
        logps.append((tok_logp * r_att).sum(-1))                                                   # (B,)
    return logps[0], logps[1]


def log_step(st, bar, desc, steps, model, cfg, tokens, t0, **row):
    """A training loop's log line: the row (step, loss, ...) plus tokens/s, MFU and peak memory, appended to the stage's
    log (done.json), its loss shown on the progress bar, the line printed."""
    row = {**row, **speed(model, tokens, train_flops(cfg), time.time() - t0)}
    st["log"].append(row)
    bar.set_postfix(loss=row["loss"])
    shown = [f"{v} {k[:-6]}/s" if k.endswith("_per_s") else f"MFU {v:.1%}" if k == "mfu" else f"{k.replace('_', ' ')} {v}"
             for k, v in row.items() if k not in ("step", "epoch", "peak_gib")]
    tqdm.write(f"  {desc} step {row['step']}/{steps} {' '.join(shown)} peak memory {row['peak_gib']} GiB")


def restore_best(model, folder):
    """--val: the weights of the best validation step (keep_best's folder/best.pt) back into the model; file removed."""
    load_weights(model, torch.load(f"{folder}/best.pt", map_location="cpu"))
    sync()
    if RANK == 0:
        os.remove(f"{folder}/best.pt")


def keep_best(model, tok, val, cfg, step, st, folder, desc):
    """--val: greedy accuracy on the held-out problems now; the weights go to folder/best.pt if it is the best so far
    (the first best on ties). Logged in the stage's done.json as val_log, best_step, best_val."""
    rng, was_training = torch.get_rng_state(), model.training
    os.makedirs(f"{folder}/val", exist_ok=True)
    with whole(model):  # --shard: each rank decodes its own batches
        acc = evaluate(model, tok, val, dataclasses.replace(cfg, eval_k=0), f"{folder}/val/step{step}.jsonl",
                       f"{desc} validation")["accuracy"]
    torch.set_rng_state(rng)
    model.train(was_training)
    st.setdefault("val_log", []).append({"step": step, "val_acc": acc})
    if acc > st.get("best_val", -1.0):
        st["best_val"], st["best_step"] = acc, step
        weights = gathered(model.state_dict())
        if RANK == 0:
            with writing(f"{folder}/best.pt"):
                torch.save(weights, f"{folder}/best.pt.tmp")
                os.replace(f"{folder}/best.pt.tmp", f"{folder}/best.pt")
        sync()  # under torchrun every rank sees the same accuracy, and the file before it reads it back
    tqdm.write(f"  {desc} step {step} validation accuracy {acc:.3f} (best {st['best_val']:.3f} at {st['best_step']})")


def make_optimizer(model, lr, total_steps, betas=(0.9, 0.95)):
    """AdamW with linear warmup and decay. A weight narrower than fp32 (bf16 on CUDA) is stepped through an fp32
    master copy, as mixed-precision training does: bf16 keeps 8 bits of mantissa, so an update under ~1/256 of a
    weight rounds away (lr 1e-6, 200 steps of a steady gradient: plain AdamW on bf16 weights lost 99% of the
    movement an fp32 run made; through masters, one rounding's worth; tested). opt.masters holds the (weight, fp32
    copy) pairs; optimizer_step keeps them in step. Costs 4 bytes a weight, and fp32 moments 8."""
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p if p.dtype == torch.float32 else p.detach().float() for p in params]
    opt = torch.optim.AdamW(masters, lr=lr, weight_decay=0.0, betas=betas)
    opt.masters = [(p, m) for p, m in zip(params, masters) if m is not p]
    warm = max(1, total_steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (total_steps - s) / max(1, total_steps - warm))))
    return opt, sched


def optimizer_step(opt, sched):
    """Clip the gradient norm to 1, take the AdamW step, zero the gradients. bf16 weights hand their gradients to
    their fp32 masters first and take the masters' new values after (rounded once, not accumulated in bf16)."""
    for p, m in opt.masters:
        m.grad, p.grad = (None if p.grad is None else p.grad.float()), None
    torch.nn.utils.clip_grad_norm_([m for g in opt.param_groups for m in g["params"]], 1.0)
    opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, m in opt.masters:
            p.copy_(m)


# ---------------------------------------------------------------------------------------------------------------
# The shipped base: data/bigstep/base holds the default base as data (weights, config, tokenizer, and base.json: the
# settings it was trained with, each file's size and sha256, and what it can do), so a first run trains none.
# ---------------------------------------------------------------------------------------------------------------


SHIPPED_BASE = {"bigstep": "data/bigstep/base", "star": "data/star/base"}
BASE_STEPS = {"bigstep": 2000, "star": 4000}  # each task's default --base_steps (the star's look-up comes late: README)
BASE_KEYS = ("d_model", "n_layers", "n_heads", "base_steps", "base_seed", "batch_size", "lr", "sort_len", "lora_rank")
REBUILD = "rebuild it with: python stepneg.py --mode make_data (it retrains the bases: about 10 minutes on 2 CPU cores)"


def hint_rebuild(path):
    return f"; {REBUILD}" if os.path.abspath(path) in map(os.path.abspath, SHIPPED_BASE.values()) else ""


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def shipped_base_fits(cfg):
    """Is the shipped base the one these settings ask for? True when cfg's BASE_KEYS equal the ones base.json records
    (False: other settings train a base of their own). Before saying True, every shipped file is checked against its
    recorded size and sha256: a missing or damaged base stops with the file's name and the command that rebuilds it,
    never a silent start from other weights."""
    mine, shipped = {k: getattr(cfg, k) for k in BASE_KEYS}, SHIPPED_BASE[cfg.task]
    manifest = f"{shipped}/base.json"
    if not os.path.exists(manifest):
        if mine == {**{k: getattr(Config, k) for k in BASE_KEYS}, "base_steps": BASE_STEPS[cfg.task]}:  # the defaults
            raise SystemExit(f"error: {manifest}: missing, so the shipped base cannot be checked; {REBUILD}")
        return False
    try:
        info = json.load(open(manifest))
        settings, files = info["settings"], info["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: {manifest}: not a base manifest ({e!r}); {REBUILD}") from None
    if settings != mine:
        return False
    for name, want in files.items():
        path = f"{shipped}/{name}"
        if not os.path.exists(path):
            raise SystemExit(f"error: {path}: missing from the shipped base; {REBUILD}")
        if os.path.getsize(path) != want["bytes"] or sha256(path) != want["sha256"]:
            raise SystemExit(f"error: {path}: damaged ({os.path.getsize(path)} bytes, sha256 differs from {manifest}, "
                             f"which records {want['bytes']}); {REBUILD}")
    return True


def base_skill(model, tok, cfg, n=1000, seed=1):
    """The share of n fresh operation lists (base_corpus, another seed than the base's own; --task star: chains to
    follow) the model answers right, greedily: what the base holds. base.json records it for n = 1000; a test checks
    it on the shipped base."""
    corpus = star_base_corpus(seed, n) if cfg.task == "star" else base_corpus(seed, n)
    lists = [{"question": r["question"], "gold": r["response"].split("The answer is ")[-1]} for r in corpus]
    with tempfile.TemporaryDirectory() as d:
        return evaluate(model, tok, lists, dataclasses.replace(cfg, eval_k=0), f"{d}/lists.jsonl",
                        "base skill")["accuracy"]


def ship_base(cfg, task="bigstep"):
    """--mode make_data: train a task's default base (in OUT/make_data, resumable) and write it to data/TASK/base with
    its base.json. Same host and torch: the same bytes as before; another host: the same quality, other bits."""
    bc = dataclasses.replace(Config(), task=task, base_steps=BASE_STEPS[task], device=cfg.device,
                             out=f"{cfg.out}/make_data" + ("" if task == "bigstep" else f"_{task}"))
    check_out_folder(bc)
    path = run_base(bc, shipped=False).model
    model, tok = load_model(bc, path)
    skill = base_skill(model, tok, bc)
    shipped = SHIPPED_BASE[task]
    tmp = shipped + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    shutil.copytree(path, tmp)
    files = {f: {"bytes": os.path.getsize(f"{tmp}/{f}"), "sha256": sha256(f"{tmp}/{f}")}
             for f in sorted(os.listdir(tmp))}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown") if os.path.exists("/proc/cpuinfo") else "unknown"
    info = {"settings": {k: getattr(bc, k) for k in BASE_KEYS}, "files": files,
            "fresh_lists_right": skill, "trained_on": f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}",
            "train_s": stage_done(bc, "base")["wall_s"]}
    write_text(f"{tmp}/base.json", json.dumps(info, indent=1) + "\n")
    if os.path.exists(shipped):
        shutil.rmtree(shipped)
    os.replace(tmp, shipped)
    print(f"wrote {shipped} (the base: {skill:.1%} of 1,000 fresh {'chains' if task == 'star' else 'operation lists'} "
          "answered greedily)")


# ---------------------------------------------------------------------------------------------------------------
# Stage book-keeping: a finished stage is reused after a check of its files; a redone one makes later ones stale.
# ---------------------------------------------------------------------------------------------------------------


def stage_done(cfg, name):
    """The stage's result if it finished and every output it recorded is still there with the same size, else None
    (a stage whose outputs were lost or changed is redone, not trusted)."""
    path = f"{cfg.out}/{name}/done.json"
    if not os.path.exists(path):
        return None
    result = json.load(open(path))
    for rel, size in result.get("outputs", {}).items():
        f = f"{cfg.out}/{name}/{rel}"
        if not os.path.exists(f) or os.path.getsize(f) != size:
            print(f"{f}: missing or changed since the stage finished; redoing stage {name}")
            return None
    return result


# What each stage's outputs are computed from: a stage that is redone makes these stale, so they are redone too.
DOWNSTREAM = {"base": ["sft", "rft"], "sft": ["eval_sft", "samples", "rft"],
              "samples": ["rft", "dpo", "per_step", "per_step_awr", "per_step_oracle", "audit"],
              "rft": ["eval_rft"], "dpo": ["eval_dpo"], "per_step": ["eval_per_step"],
              "per_step_awr": ["eval_per_step_awr"], "per_step_oracle": ["eval_per_step_oracle"]}


def invalidate_downstream(cfg, name):
    for later in DOWNSTREAM.get(name, []):
        if os.path.exists(f"{cfg.out}/{later}/done.json"):
            print(f"{cfg.out}/{later}: made from an earlier {name}; it will be redone")
            sync()  # every rank has seen it before rank 0 removes it
            if RANK == 0:
                os.remove(f"{cfg.out}/{later}/done.json")
            sync()
        invalidate_downstream(cfg, later)


def finish_stage(cfg, name, result):
    invalidate_downstream(cfg, name)
    keep = lambda f: f != "done.json" and f != "train_state.pt" and not f.endswith(".tmp")  # noqa: E731
    result["outputs"] = {os.path.relpath(os.path.join(d, f), f"{cfg.out}/{name}"): os.path.getsize(os.path.join(d, f))
                         for d, _, files in os.walk(f"{cfg.out}/{name}") for f in files if keep(f)}
    write_jsonl(f"{cfg.out}/metrics.jsonl", [{"stage": name, **{k: v for k, v in result.items()
                                                                  if k not in ("log", "outputs")}}],
                mode="a")
    write_text(f"{cfg.out}/{name}/done.json", json.dumps(result, indent=1))
    if os.path.exists(f"{cfg.out}/{name}/train_state.pt"):  # the stage is done: its resume state is not needed
        sync()  # (removed only now, so a done.json that failed to write leaves a state to resume from)
        if RANK == 0:
            os.remove(f"{cfg.out}/{name}/train_state.pt")
        sync()
    return result


def check_out_folder(cfg):
    """An output folder belongs to one set of result-changing settings: mixing would silently corrupt caches."""
    path = f"{cfg.out}/config.json"
    mine = {k: getattr(cfg, k) for k in RESULT_KEYS}
    if os.path.exists(path):
        theirs = json.load(open(path))
        diff = [k for k in RESULT_KEYS if k in theirs and theirs[k] != mine[k]]
        if diff:
            raise SystemExit(f"{cfg.out} was made with other settings ({', '.join(f'--{k} {theirs[k]!r}' for k in diff)}"
                             f"); use a new --out or the same settings")
    write_text(path, json.dumps(mine, indent=1))


# Settings that change what a stage computes: an output folder made with other values is refused, not mixed.
# Not among them: what only picks which stages run (mode, loss: per_step and per_step_awr are separate stages, so
# --loss both adds AWR to a per_step folder; audit, whose stage records its N), where and how often things are
# written, how processes share the work (device, shard: the same numbers up to float rounding, tested), and each
# size's epochs (held by that size's own folder).
RESULT_KEYS = [f.name for f in dataclasses.fields(Config) if f.name not in (
    "mode", "loss", "audit", "out", "device", "shard", "log_every", "ckpt_every", "doublings", "seeds", "size_epochs")]


# ---------------------------------------------------------------------------------------------------------------
# Reports: a run's summary table and worked example; the scaling table and its picture (scaling.md, scaling.svg).
# ---------------------------------------------------------------------------------------------------------------


def mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    m = sum(values) / len(values)
    sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return f"{m:.3g} ± {sd:.2g}" if len(values) > 1 else f"{m:.3g}"


def seeds_table(runs, key="correct", what="Test accuracy"):
    """--seeds: each stage's test accuracy per seed with mean ± sd; each method's difference from SFT per seed, paired
    on the same test problems (the mean of correct_method - correct_sft over problems, ± two standard errors of that
    mean, paired()), and its mean over seeds ± two standard errors of that mean (from the seeds' spread).
    runs: {seed: cfg}; key: the per-problem score read from each eval's responses (--task star: also first_edge)"""
    seeds = list(runs)
    names = [n for n in ("sft", "rft", "dpo", "per_step", "per_step_awr", "per_step_oracle")
             if all(stage_done(c, f"eval_{n}") for c in runs.values())]
    right = {(s, n): [r[key] for r in read_jsonl(f"{runs[s].out}/eval_{n}/responses.jsonl")] for s in seeds
             for n in names}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    sd = lambda xs: (sum((x - mean(xs)) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0  # noqa: E731
    cols = " | ".join(f"seed {s}" for s in seeds)
    lines = [f"{what} (%) on {len(right[seeds[0], 'sft'])} problems; each seed's run in seed<S>/, every one from "
             "the same start.", "", f"| stage | {cols} | mean ± sd | ± 2 SE |", "|---|" + "---|" * (len(seeds) + 2)]
    for n in names:
        accs = [100 * mean(right[s, n]) for s in seeds]
        lines.append(f"| {n} | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {mean(accs):.1f} ± {sd(accs):.1f} | "
                     f"{2 * sd(accs) / len(accs) ** 0.5:.1f} |")
    if len(names) > 1:
        lines += ["", "Difference from SFT (points), paired on the same test problems, ± two standard errors:", "",
                  f"| method | {cols} | mean ± 2 SE over seeds |", "|---|" + "---|" * (len(seeds) + 1)]
    for n in names[1:]:
        diffs = [paired(right[s, n], right[s, "sft"]) for s in seeds]
        means = [100 * d for d, _ in diffs]
        lines.append(f"| {n} | " + " | ".join(f"{100 * d:+.1f} ± {200 * se:.1f}" for d, se in diffs)
                     + f" | {mean(means):+.1f} ± {2 * sd(means) / len(means) ** 0.5:.1f} |")
    return "\n".join(lines)


def bracket_text(beats, trails, n):
    """bracket()'s pair as a reading: "4-8x" (beats SFT on 4n, not on 8n), "> 8x" (beats every size), "< 1x" (not even
    SFT on n), "8x, not 4x" (SFT's curve dips between them)."""
    lo, hi = beats and beats[0] / n, trails and trails[0] / n
    if beats is None:
        return f"< {hi:g}x"
    if trails is None:
        return f"> {lo:g}x"
    return f"{lo:g}-{hi:g}x" if hi > lo else f"{lo:g}x, not {hi:g}x"


def fit_text(r, sizes):
    if r["multiplier"] is not None:
        return f"{r['multiplier']:.2f}"
    if r["fit_multiplier"] is None:
        return "n/a (SFT does not improve)"
    if r["fit_multiplier"] * sizes[0] > sizes[-1]:
        return f"> {sizes[-1] / sizes[0]:g}x, past the range"
    return "< 1x, below the range"


def scaling_table(rows, credit, sizes, seconds, pooled=None):
    """scaling.md: per method the bracket (bracket(): what the test accuracies show, per seed and over the seeds'
    problems pooled) and the fitted n'/n where it falls inside the measured sizes; then each bracket's paired
    differences with two standard errors, and the credit checks."""
    seeds, n = sorted({r["seed"] for r in rows}), sizes[0]
    lines = [f"Multiplier as measured: the bracket between the largest SFT size a method beats on the test problems "
             f"and the smallest it does not (x n = {n}; the paired differences below). The fit, SFT error = a + b "
             f"ln(problems) on sizes {sizes}, gives n'/n only where n' lies inside them. Seeds {seeds}; wall "
             f"{seconds / 60:.1f} min.", "",
             "| method | problems | test acc | bracket, per seed | bracket, seeds pooled | fitted n'/n, per seed | fitted, "
             "mean ± sd | samples | rollouts | tokens sampled | tokens trained |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    detail = ["", "Paired differences from SFT on the same test problems (points, ± 2 SE): the largest size beaten, the "
              "smallest not.", ""]
    say = lambda s: "none" if s is None else f"SFT on {s[0]} ({100 * s[1]:+.1f} ± {200 * s[2]:.1f})"  # noqa: E731
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        avg = lambda key: round(sum(r[key] for r in rs) / len(rs))  # noqa: E731
        fits = [r["multiplier"] for r in rs]
        fitted = mean_sd(fits) if None not in fits else f"n/a ({fits.count(None)} of {len(fits)} outside)"
        sft = method.startswith("sft")  # SFT's own rows: their fit only (a bracket against itself says nothing)
        pool = bracket_text(*pooled[method], n) if pooled and method in pooled and not sft else "-"
        lines.append(f"| {method} | {rs[0]['problems']} | {mean_sd([r['accuracy'] for r in rs])} | "
                     f"{'-' if sft else ' / '.join(bracket_text(r['beats'], r['trails'], n) for r in rs)} | {pool} | "
                     f"{' / '.join(fit_text(r, sizes) for r in rs)} | {fitted} | {avg('samples')} | {avg('rollouts')} | "
                     f"{avg('tokens_sampled')} | {avg('tokens_trained')} |")
        if not sft:
            detail.append(f"- {method}: " + "; ".join(f"seed {r['seed']} beats {say(r['beats'])}, not {say(r['trails'])}"
                                                      for r in rs)
                          + (f"; pooled beats {say(pooled[method][0])}, not {say(pooled[method][1])}"
                             if pooled and method in pooled else ""))
    lines += detail
    if any(len(c) > 2 for c in credit):
        lines += ["", "Credit against the toy's truth (mean ± sd over seeds):", ""]
        for key in [k for k in credit[0] if k not in ("stage", "seed") and not k.endswith("histogram")]:
            lines.append(f"- {key}: {mean_sd([c.get(key) for c in credit])}")
        for c in credit:
            lines.append(f"- seed {c['seed']}: pit positions {c['pit_histogram']}, first wrong step "
                         f"{c['first_wrong_histogram']}")
    return "\n".join(lines)


COLOURS = {"sft": "#333333", "rft": "#1f77b4", "rft_budget": "#17becf", "dpo": "#ff7f0e", "per_step": "#d62728",
           "per_step_awr": "#8c564b", "per_step_oracle": "#9467bd"}


def scaling_svg(rows, sizes, pooled=None):
    """The headline picture as hand-written SVG: SFT test error against problems (log axis, only the measured sizes),
    seeds as faint points, with the line fitted to them (mean a, b over seeds); each method's mean error at n as a
    point, joined by a dashed line to a ring at n', the SFT size the fit says reaches that error (geometric mean over
    seeds) -- or, when n' lies outside the measured sizes, to an arrow at that edge. The legend gives each method's
    bracket (seeds pooled) and fit and is as wide as its longest line; points carry data-* attributes (the numbers)."""
    is_sft = lambda r: r["method"] == "sft" or r["method"].startswith("sft_")  # noqa: E731
    methods = list(dict.fromkeys(r["method"] for r in rows if not is_sft(r)))
    mean = lambda vs: sum(vs) / len(vs)  # noqa: E731
    esc = lambda s: s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")  # noqa: E731
    n = sizes[0]
    eq = {}
    for m in methods:
        vs = [r["sft_equivalent_problems"] for r in rows if r["method"] == m and r["sft_equivalent_problems"]]
        eq[m] = math.exp(mean([math.log(v) for v in vs])) if vs else None
    labels = {}
    for m in methods:
        fit = ("fit n/a" if eq[m] is None else f"fit {eq[m] / n:.2g}x" if n / 1.01 <= eq[m] <= sizes[-1] * 1.01
               else f"fit {'>' if eq[m] > sizes[-1] else '<'} {(sizes[-1] if eq[m] > sizes[-1] else n) / n:g}x")
        labels[m] = f"{m}: {bracket_text(*pooled[m], n) + ', ' if pooled and m in pooled else ''}{fit}"
    legend = [f"SFT on {sizes[0]}..{sizes[-1]}"] + list(labels.values())
    left, plot, top, bottom, H = 64, 470, 20, 52, max(420, 60 + 18 * len(legend))
    right = 40 + 7 * max(len(s) for s in legend)  # about 7 px a character at 12 px: the legend is never cut
    W = left + plot + right
    lo, hi = math.log(sizes[0]) - 0.25, math.log(sizes[-1]) + 0.25  # the measured sizes only, whatever a fit says
    errs = [1 - r["accuracy"] for r in rows if r["accuracy"] is not None]
    e_lo, e_hi = max(0.0, min(errs) - 0.05), min(1.0, max(errs) + 0.05)
    if e_hi - e_lo < 0.1:  # a flat curve: keep the tick labels apart
        e_lo, e_hi = max(0.0, e_lo - 0.05), min(1.0, e_hi + 0.05)
    X = lambda m: left + (math.log(m) - lo) / (hi - lo) * plot                          # noqa: E731
    Y = lambda e: top + (e_hi - e) / max(1e-9, e_hi - e_lo) * (H - top - bottom)          # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<line x1="{left}" y1="{H - bottom}" x2="{left + plot}" y2="{H - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{H - bottom}" stroke="black"/>',
           f'<text x="{left + plot / 2}" y="{H - 12}" text-anchor="middle">training problems (log scale)</text>',
           f'<text x="16" y="{(top + H - bottom) / 2}" transform="rotate(-90 16 {(top + H - bottom) / 2})" '
           f'text-anchor="middle">test error</text>']
    gap = X(sizes[1]) - X(sizes[0]) if len(sizes) > 1 else plot
    every = max(1, math.ceil(7 * len(str(sizes[-1])) / gap + 0.2))  # a size label every `every` sizes: never overlapping
    for i, m in enumerate(sizes):
        if i % every == 0:
            out.append(f'<text x="{X(m):.1f}" y="{H - bottom + 16}" text-anchor="middle">{m}</text>')
    for k in range(5):
        e = e_lo + k * (e_hi - e_lo) / 4
        out.append(f'<text x="{left - 6}" y="{Y(e) + 4:.1f}" text-anchor="end">{e:.2f}</text>')
    a, b = mean([r["fit_a"] for r in rows]), mean([r["fit_b"] for r in rows])
    x0, x1 = sizes[0], sizes[-1]
    out.append(f'<line x1="{X(x0):.1f}" y1="{Y(a + b * math.log(x0)):.1f}" x2="{X(x1):.1f}" '
               f'y2="{Y(a + b * math.log(x1)):.1f}" stroke="{COLOURS["sft"]}" data-fit="{a:.4f} {b:.4f}"/>')
    for r in rows:  # every seed's measurement, faint
        if r["accuracy"] is not None:
            out.append(f'<circle cx="{X(r["problems"]):.1f}" cy="{Y(1 - r["accuracy"]):.1f}" r="3" fill="'
                       f'{COLOURS.get("sft" if is_sft(r) else r["method"], "gray")}" fill-opacity="0.3" '
                       f'data-seed="{r["seed"]}" data-method="{r["method"]}"/>')
    lx = left + plot + 16
    out += [f'<line x1="{lx}" y1="{top + 10}" x2="{lx + 12}" y2="{top + 10}" stroke="{COLOURS["sft"]}"/>',
            f'<text x="{lx + 16}" y="{top + 14}">{esc(legend[0])}</text>']
    for i, m in enumerate(methods, 1):
        rs, colour = [r for r in rows if r["method"] == m], COLOURS.get(m, "gray")
        e = mean([1 - r["accuracy"] for r in rs])
        out.append(f'<circle cx="{X(n):.1f}" cy="{Y(e):.1f}" r="5" fill="{colour}" data-method="{m}" '
                   f'data-problems="{n}" data-error="{e:.4f}"/>')
        if eq[m] is not None:
            end = min(max(eq[m], sizes[0]), sizes[-1]) if not n / 1.01 <= eq[m] <= sizes[-1] * 1.01 else eq[m]
            out.append(f'<line x1="{X(n):.1f}" y1="{Y(e):.1f}" x2="{X(end):.1f}" y2="{Y(e):.1f}" stroke="{colour}" '
                       f'stroke-dasharray="4 3"/>')
            if end == eq[m]:
                out.append(f'<circle cx="{X(end):.1f}" cy="{Y(e):.1f}" r="6" fill="none" stroke="{colour}" '
                           f'stroke-width="2" data-method="{m}" data-equivalent="{eq[m]:.0f}"/>')
            else:  # the fit's n' lies outside the measured sizes: an arrow at that edge, not a point off the line
                d = 8 if eq[m] > sizes[-1] else -8
                out.append(f'<path d="M{X(end):.1f},{Y(e) - 5:.1f} L{X(end) + d:.1f},{Y(e):.1f} L{X(end):.1f},'
                           f'{Y(e) + 5:.1f} Z" fill="{colour}" data-method="{m}" data-outside="{eq[m]:.0f}"/>')
        out += [f'<circle cx="{lx + 6}" cy="{top + 10 + 18 * i}" r="5" fill="{colour}"/>',
                f'<text x="{lx + 16}" y="{top + 14 + 18 * i}">{esc(labels[m])}</text>']
    return "\n".join(out + ["</svg>"]) + "\n"


def summary(cfg, names):
    """The table a run ends with: test accuracy and what each stage cost."""
    K = f"| pass@{cfg.eval_k} | maj@{cfg.eval_k} " if cfg.eval_k else ""
    lines = [f"| stage | test acc {K}| unparsable | train examples | pairs | rollouts | stage s | eval s |",
             "|---|---|---|---|---|---|---|---|" + ("---|---|" if K else "")]
    samples = stage_done(cfg, "samples") or {}
    for name in names:
        st, ev = stage_done(cfg, name) or {}, stage_done(cfg, f"eval_{name}") or {}
        wall = st.get("wall_s", 0) + (samples.get("wall_s", 0) if name != "sft" else 0)
        k = "".join(f"| {ev.get(key, float('nan')):.3f} " for key in (f"pass@{cfg.eval_k}", f"maj@{cfg.eval_k}")) if K else ""
        lines.append(f"| {name} | {ev.get('accuracy', float('nan')):.3f} {k}| {ev.get('unparsable', '-')} | "
                     f"{st.get('train_examples', '-')} | {st.get('pairs', '-')} | {st.get('rollouts', '-')} | "
                     f"{wall:.0f} | {ev.get('wall_s', 0):.0f} |")
    if samples:
        lines.append(f"\nsamples from pi_sft: {samples['samples']} (accuracy {samples['sample_accuracy']:.3f}, "
                     f"{samples['wall_s']:.0f} s, counted in every stage that uses them)")
    ps = stage_done(cfg, "per_step")
    if ps and "per_step" in names:
        tps = ps.get("rollout_tokens_per_s")
        lines.append(f"per-step: {ps['negatives']} negatives, {ps['rollouts']} rollouts, {ps['rollout_tokens']} "
                     f"rollout tokens ({f'{tps} tokens/s' if tps else 'all reused'}), {ps['pairs_per_1k_rollouts']} pairs "
                     f"per 1k rollouts, pit positions {ps['pit_histogram']}")
    text = "\n".join(lines)
    write_text(f"{cfg.out}/summary.md", text + "\n")
    return text


def worked_example(cfg, train):
    """Credit assignment on one negative of this run's own data, as a reader wants to see it: the question, the
    negative's steps, Q-hat of every prefix with its rollout counts, the pit and why, and the pair it became (and, on
    an embedded task, the true first wrong step). The first pair whose pit is at step 2 or later (--task star: the
    first pair). -> markdown"""
    pairs = read_jsonl(f"{cfg.out}/per_step/pairs.jsonl")
    first = 1 if star_graph(train[0]["question"]) else 2  # the star graph's pit is its first edge; bigstep's later
    pair = next((p for p in pairs if p["pit"] >= first), pairs[0] if pairs else None)
    if pair is None:
        return ""
    prob, M, c = train[pair["pid"]], cfg.rollouts, pair["pit"]
    neg = next(n for n in collect_negatives(train, read_jsonl(f"{cfg.out}/samples/samples.jsonl"), cfg.max_negatives)
               if n["nid"] == pair["nid"])
    steps, q = split_steps(neg["response"], cfg.step_cap), pair["q"]
    show = lambda t: t.strip().replace("\n", " / ") or "(empty)"  # noqa: E731
    lines = [f"Question: {prob['question']} (answer {prob['gold']})", "",
             "| prefix | last step | Q-hat (rollouts reaching the answer) |", "|---|---|---|",
             f"| x | - | {q[0]:.2f} ({round(q[0] * cfg.k_samples)} of the {cfg.k_samples} samples at x) |"]
    for i, step in enumerate(steps, 1):
        value = ("not rolled out: past the pit" if q[i] is None else "0 (the negative's own final answer is wrong)"
                 if i == len(steps) else f"{q[i]:.2f} ({round(q[i] * M)}/{M})")
        lines.append(f"| x + y_{'1..y_' * (i > 1)}{i} | {show(step)} | {value} |")
    why = (f"the first prefix from which no rollout reaches the answer (Q-hat_{c} = 0, Q-hat_{c - 1} = {q[c - 1]:.2f})"
           if cfg.credit == "first_pit" else f"the largest drop in Q-hat ({q[c - 1]:.2f} -> {q[c]:.2f})")
    lines += ["", f"Pit: step {c}, {why}."]
    if has_truth(prob["question"]):
        lines.append(f"The task's truth: the first wrong step is step {first_wrong_step(steps, prob['question'])}.")
    lines += ["", "The pair it became (DPO raises chosen over rejected, after the same prompt):",
              f"- prompt ends: ...{show(pair['prompt'].split('Answer:')[-1])[-60:] if c > 1 else 'Answer:'}",
              f"- chosen:   {show(pair['chosen'])}", f"- rejected: {show(pair['rejected'])}"]
    text = "\n".join(lines)
    write_text(f"{cfg.out}/per_step/example.md", text + "\n")
    return text


# ---------------------------------------------------------------------------------------------------------------
# The command line: one flag per Config field, its help text read from the field's comment.
# ---------------------------------------------------------------------------------------------------------------


CHOICES = {"mode": ("make_data", "synth", "sft", "rft", "dpo", "per_step", "eval", "all", "scaling", "bench_rollouts",
                    "bench_dpo", "bench_shapes"),
           "device": ("auto", "cpu", "cuda"), "credit": ("first_pit", "min_advantage"), "value": ("mean", "bok"),
           "pair_form": ("step", "full"),
           "loss": ("dpo", "awr", "both"), "task": ("bigstep", "arith", "star")}


def parse_config(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    helps, groups = config_help()
    sections = {}
    for f in dataclasses.fields(Config):
        g = sections.get(groups[f.name]) or sections.setdefault(groups[f.name], ap.add_argument_group(groups[f.name]))
        text = f"{helps[f.name]} (default: {f.default!r})".replace("%", "%%")
        if f.type is bool or f.type == "bool":
            g.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), default=f.default,
                           metavar="true|false", help=text)
        else:  # these defaults depend on the mode or task (below)
            late = f.name in ("n_train", "val", "sft_epochs", "seeds", "loss", "base_steps")
            g.add_argument(f"--{f.name}", type=type(f.default), default=None if late else f.default,
                           choices=CHOICES.get(f.name), metavar=type(f.default).__name__.upper() if f.name not in CHOICES
                           else None, help=text)
    args = vars(ap.parse_args(argv))
    scaling = args["mode"] == "scaling"  # it trains SFT on up to 2^doublings n problems, so its n is smaller
    if args["n_train"] is None:
        args["n_train"] = {"arith": 500 if scaling else 1000, "bigstep": 960 if scaling else Config.n_train,
                           "star": 960 if scaling else 7700}[args["task"]]  # star: every graph but --val's
    if args["val"] is None:  # scaling trains every SFT and RFT to its best on held-out problems (as does the star)
        args["val"] = 300 if (scaling and args["task"] == "bigstep") or args["task"] == "star" else 0
    if args["sft_epochs"] is None and scaling and args["val"]:  # validation picks each size's checkpoint; n and 2n
        args["sft_epochs"] = 12                                     # stop gaining by 12 epochs, 4n and 8n later (README)
        if args["task"] == "bigstep" and args["doublings"] == 3 and not args["size_epochs"]:
            args["size_epochs"] = "12,12,24,16"
    if args["sft_epochs"] is None:
        args["sft_epochs"] = 2 if args["task"] == "star" else Config.sft_epochs
    if args["seeds"] is None:
        args["seeds"] = 3 if scaling else Config.seeds
    if args["base_steps"] is None:
        args["base_steps"] = BASE_STEPS.get(args["task"], Config.base_steps)
    if args["loss"] is None:  # the star graph's table has AWR beside per-step DPO
        args["loss"] = "both" if args["task"] == "star" else Config.loss
    if args["seeds"] < 1 or (args["seeds"] > 1 and args["mode"] not in ("sft", "rft", "dpo", "per_step", "all", "scaling")):
        ap.error(f"--seeds {args['seeds']}: one or more, and more than one only with --mode sft, rft, dpo, per_step, all "
                 "or scaling")
    if args["size_epochs"] and (not re.fullmatch(r"\d+(,\d+)*", args["size_epochs"])
                                or len(args["size_epochs"].split(",")) != args["doublings"] + 1):
        ap.error(f"--size_epochs {args['size_epochs']}: one whole number of epochs per size, n first, "
                 f"{args['doublings'] + 1} in all (--doublings {args['doublings']})")
    if args["shard"] and args["lora_rank"]:
        ap.error("--shard with --lora_rank: adapters train a few weights, whose optimizer state is already small; "
                 "shard full fine-tuning (--lora_rank 0) or use LoRA without --shard (each process a whole copy)")
    positive = ("rollouts", "k_samples", "beta", "beta_awr", "bok_k")
    for name in ("eval_k", "n_train", "n_test", "val", "base_steps", "audit") + positive:
        if args[name] < 0 or (args[name] == 0 and name in positive):
            ap.error(f"--{name} {args[name]}: must be {'positive' if name in positive else '0 or more'}")
    for name in ("train", "test"):
        args[name] = args[name] or f"data/{args['task']}/{name}.jsonl"
    return Config(**args)


def config_help():
    """{field: its comment in the Config block}, and the group headers before each field: the block above is the one
    source of what every flag means, for the reader of the file and for --help alike."""
    import inspect
    helps, groups, group, last = {}, {}, "", None
    for line in inspect.getsource(Config).splitlines()[2:]:
        m = re.match(r"\s{4}(\w+): \w+ = .*?(?:#\s*(.*))?$", line)
        if m:
            last, helps[m[1]], groups[m[1]] = m[1], (m[2] or "").strip(), group
        elif re.match(r"\s{4}#", line):
            group = line.strip("# ").strip()
        elif re.match(r"\s+#", line) and last:  # a comment's continuation line
            helps[last] += " " + line.strip("# ").strip()
    return helps, groups


# ---------------------------------------------------------------------------------------------------------------
# Benchmarks: --mode bench_rollouts, bench_dpo, bench_shapes (their figures are in the README).
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def transformers_generate(model, tok, prompts, temperature, max_new_tokens, seed):
    """The same batch through transformers' model.generate, for the benchmark and the test that both write the same."""
    enc = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    ids, att = left_pad(enc, tok.pad_token_id, next(model.parameters()).device)                    # (B, T)
    torch.manual_seed(seed)
    kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    out = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)[:, ids.shape[1]:]  # (B, new)
    rows = [r[:r.index(tok.eos_token_id) + 1] if tok.eos_token_id in r else r for r in out.tolist()]
    return [tok.decode(r, skip_special_tokens=True) for r in rows], [len(r) for r in rows]


def bench_rollouts(cfg, train, n_negatives=256):
    """--mode bench_rollouts, after a per_step run in the same --out: on the first n_negatives negatives of its
    samples, (1) the rollouts first-pit early stopping spends against exploring every prefix, and (2) stepneg's
    sampler against transformers' model.generate, side by side over the same batches of those rollout rows, same
    seeds. Fresh caches, nothing reused."""
    import tempfile
    path = f"{cfg.out}/samples/samples.jsonl"
    if not os.path.exists(path):
        raise SystemExit(f"{path}: not found; run --mode per_step with the same --out first")
    model, tok = load_model(cfg, cfg.init or f"{cfg.out}/sft/model")
    samples = read_jsonl(path)
    negs = collect_negatives(train, samples, cfg.max_negatives)[:n_negatives]
    runs = {}
    for credit in ("first_pit", "min_advantage"):   # min_advantage explores every prefix
        with tempfile.TemporaryDirectory() as tmp:
            c = dataclasses.replace(cfg, credit=credit)
            _, _, acct = step_values(model, tok, train, samples, [dict(n) for n in negs], c, tmp)
            runs[credit] = acct
            if credit == "first_pit":
                keys = [r["key"] for r in read_jsonl(f"{tmp}/rollouts.jsonl")]
    # the first-pit rows again (rebuilt from their keys "negative/prefix length/rollout"), through both samplers
    by_nid = {n["nid"]: n for n in negs}
    rows = []
    for key in keys:
        nid, i, _ = (int(x) for x in key.split("/"))
        n = by_nid[nid]
        rows.append(PROMPT.format(question=train[n["pid"]]["question"]) + "".join(split_steps(n["response"], cfg.step_cap)[:i]))
    batches = [rows[i:i + cfg.gen_batch] for i in range(0, len(rows), cfg.gen_batch)]
    timing, texts = {}, {}
    for name, fn in (("stepneg", generate), ("transformers", transformers_generate)):
        fn(model, tok, batches[0][:8], cfg.temperature, 8, 0)  # warm-up
        t0, texts[name], n_tok = time.time(), [], 0
        for b, batch in enumerate(batches):
            out = fn(model, tok, batch, cfg.temperature, cfg.max_new_tokens, cfg.seed + b)
            texts[name], n_tok = texts[name] + out[0], n_tok + sum(out[1])
        timing[name] = (n_tok, time.time() - t0)
    fp, every = runs["first_pit"], runs["min_advantage"]
    result = {"negatives": len(negs), "rows": len(rows),
              "rollouts_first_pit": fp["rollouts"], "rollouts_every_prefix": every["rollouts"],
              "rollout_saving": round(every["rollouts"] / max(1, fp["rollouts"]), 2),
              "seconds_first_pit": fp["rollout_s"], "seconds_every_prefix": every["rollout_s"],
              **{f"{name}_tokens_per_s": round(n / s) for name, (n, s) in timing.items()},
              "sampler_speedup": round(timing["transformers"][1] / timing["stepneg"][1], 2),
              "same_text": round(sum(a == b for a, b in zip(texts["stepneg"], texts["transformers"])) / len(rows), 4)}
    write_jsonl(f"{cfg.out}/metrics.jsonl", [{"stage": "bench_rollouts", **result}], mode="a")
    print("\n".join(f"{k:>28}: {v}" for k, v in result.items()))
    return result


def bench_dpo(cfg, n_pairs=256):
    """--mode bench_dpo, after a per_step run in the same --out: per-step DPO (--dpo_epochs) on its first n_pairs
    pairs from pi_sft, side by side in one process, each timed end to end: stepneg (reference log-probs precomputed,
    shared prompts branched), the same with two full forwards per pair, a loop that keeps the reference model resident
    and runs it every step, and TRL's DPOTrainer with its own reference precompute (only if trl is installed)."""
    import copy
    path = f"{cfg.out}/per_step/pairs.jsonl"
    if not os.path.exists(path):
        raise SystemExit(f"{path}: not found; run --mode per_step with the same --out first")
    # without their stored reference log-probs: every implementation timed here computes its own
    pairs = [{k: v for k, v in p.items() if not k.startswith("ref_")} for p in read_jsonl(path)[:n_pairs]]
    sft, tok = load_model(cfg, cfg.init or f"{cfg.out}/sft/model")
    c = dataclasses.replace(cfg, log_every=10 ** 9, ckpt_every=10 ** 9)
    result, device = {"pairs": len(pairs), "epochs": cfg.dpo_epochs, "batch": cfg.batch_size}, next(sft.parameters()).device

    def pairs_per_s(setup, repeats=2):  # the faster of two runs: a shared machine's other work only slows a run down
        seconds = []
        for _ in range(repeats):
            run = setup()
            t0 = time.time()
            run()
            seconds.append(time.time() - t0)
        return round(len(pairs) * cfg.dpo_epochs / min(seconds), 1)

    def resident():  # the reference model kept in memory and run on every batch of every epoch
        model, enc = copy.deepcopy(sft), pair_batches(tok, pairs)
        opt, sched = make_optimizer(model, cfg.dpo_lr, cfg.dpo_epochs * math.ceil(len(enc) / cfg.batch_size), (0.9, 0.999))
        for b in [b for _ in range(cfg.dpo_epochs) for b in range(0, len(enc), cfg.batch_size)]:
            with torch.no_grad():
                rc, rr = dpo_logps(sft, tok, enc[b:b + cfg.batch_size], cfg, device)
            pc, pr = dpo_logps(model, tok, enc[b:b + cfg.batch_size], cfg, device)
            dpo_loss(pc, pr, rc, rr, cfg.beta)[0].backward()
            optimizer_step(opt, sched)
    for name, branch in (("stepneg", True), ("two_forwards", False)):
        result[f"{name}_pairs_per_s"] = pairs_per_s(lambda: lambda: train_dpo(
            copy.deepcopy(sft), tok, pairs, dataclasses.replace(c, branch=branch), name))
    result["resident_reference_pairs_per_s"] = pairs_per_s(lambda: resident)
    try:
        import datasets
        import trl
    except ImportError:
        print("trl is not installed: its row is left out (pip install trl, in a separate environment)")
    else:
        import tempfile

        def trl_trainer():  # built (and its data tokenised) outside the clock; train() includes its reference pass
            args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=cfg.batch_size,
                                 num_train_epochs=cfg.dpo_epochs, learning_rate=cfg.dpo_lr, beta=cfg.beta,
                                 max_length=cfg.max_len, report_to=[], precompute_ref_log_probs=True,
                                 save_strategy="no", logging_steps=10 ** 9, use_cpu=device.type == "cpu",
                                 bf16=device.type == "cuda")
            data = datasets.Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
            return trl.DPOTrainer(model=copy.deepcopy(sft), args=args, train_dataset=data, processing_class=tok).train
        result[f"trl_{trl.__version__}_pairs_per_s"] = pairs_per_s(trl_trainer)
    write_jsonl(f"{cfg.out}/metrics.jsonl", [{"stage": "bench_dpo", **result}], mode="a")
    print("\n".join(f"{k:>34}: {v}" for k, v in result.items()))
    return result


# Two real learners' shapes (their config.json values) for --mode bench_shapes: random weights, nothing downloaded.
SHAPES = {
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)}


def bench_shapes(cfg, train, shapes=SHAPES):
    """--mode bench_shapes (meant for a GPU): a model of each shape with random weights and the tiny tokenizer, through
    the stages that cost: sampling (64 questions), rollouts (32 first-step prefixes x M), the reference pass and
    per-step DPO, LoRA r = 16 then full fine-tuning, on 128 per-step-shaped pairs (prompt = question + first step,
    chosen = the rest, rejected = a corrupted second step). Random weights never write EOS: every row runs
    --max_new_tokens. Per stage tokens/s or pairs/s, MFU and peak memory, a line each in metrics.jsonl; a stage that
    runs out of memory is recorded as such and the next one runs."""
    from transformers import AutoConfig, AutoModelForCausalLM
    tok, device, rows = tiny_tokenizer(), pick_device(cfg), []
    if device != "cuda" and shapes is SHAPES:
        raise SystemExit("--mode bench_shapes measures 1.5B- and 7B-shaped models on a GPU; this run has none")
    multi = [p for p in train if p["response"].count("\n") >= 2]
    pairs = [{"prompt": PROMPT.format(question=p["question"]) + lines[0] + "\n", "chosen": "\n".join(lines[1:]),
              "rejected": lines[1] + " + 1\n", "rejected_complete": False}
             for p in multi[:128] for lines in [p["response"].split("\n")]]
    prompts = {"sampling": [PROMPT.format(question=p["question"]) for p in train[:64]],
               "rollouts": [PROMPT.format(question=p["question"]) + p["response"].split("\n")[0] + "\n"
                            for p in multi[:32] for _ in range(cfg.rollouts)]}

    def record(shape, what, **kw):
        rows.append({"stage": "bench_shapes", "shape": shape, "what": what, **kw})
        print(json.dumps(rows[-1]))
        if device == "cuda":
            torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats()
    for shape, kw in shapes.items():
        torch.manual_seed(cfg.seed)
        mc = AutoConfig.for_model(**kw, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(mc, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        record(shape, "build", parameters=sum(p.numel() for p in model.parameters()))
        for what, texts in prompts.items():
            path = f"{cfg.out}/bench_shapes/{shape}_{what}.jsonl"
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if os.path.exists(path):
                os.remove(path)  # time every row, reuse none
            st = cached_generate(model, tok, list(enumerate(texts)), cfg, path, cfg.seed, f"{shape} {what}")[1]
            record(shape, what, rows=len(texts),
                   **{k: st.get(k) for k in ("new_tokens", "tokens_per_s", "mfu", "peak_gib")})
        t0 = time.time()
        with_ref = with_reference_logps(model, tok, pairs, cfg, shape)
        record(shape, "reference log-probs", pairs_per_s=round(len(pairs) / (time.time() - t0), 1),
               peak_gib=speed(model, 0, 0, 1)["peak_gib"])
        for lora in (16, 0):
            what = f"per-step DPO, {f'LoRA r = {lora}' if lora else 'full fine-tuning'}, batch {cfg.batch_size}"
            try:
                c = dataclasses.replace(cfg, lora_rank=lora, dpo_epochs=1, ckpt_every=10 ** 9)
                last = train_dpo(model, tok, with_ref, c, f"{shape} dpo")["log"][-1]
                record(shape, what, **{k: last[k] for k in ("pairs_per_s", "tokens_per_s", "mfu", "peak_gib")})
            except torch.OutOfMemoryError:
                model.zero_grad(set_to_none=True)
                record(shape, what, out_of_memory=True)
            merge_lora(model)
        del model
    write_jsonl(f"{cfg.out}/metrics.jsonl", rows, mode="a")
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    cfg = parse_config(argv)
    start_processes(cfg)
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    if cfg.mode == "make_data":
        for task in CHOICES["task"]:
            train, test = make_toy_data(task)
            write_jsonl(f"data/{task}/train.jsonl", train)
            write_jsonl(f"data/{task}/test.jsonl", test)
            print(f"wrote data/{task}/train.jsonl ({len(train)}) and data/{task}/test.jsonl ({len(test)})")
        for task in SHIPPED_BASE:
            ship_base(cfg, task)
        return
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if pick_device(cfg) == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // WORLD))
    try:
        limit = cfg.n_train * 2 ** cfg.doublings if cfg.mode == "scaling" else cfg.n_train
        train = load_problems(cfg.train, 0 if cfg.val else limit) if cfg.mode != "eval" else []
        val = None
        if cfg.val and train:  # the file's last problems, never among the training ones
            if len(train) < (limit or 1) + cfg.val:
                raise ValueError(f"{cfg.train}: --val {cfg.val} needs {(limit or 1) + cfg.val} problems, it has {len(train)}")
            train, val = train[:limit or len(train) - cfg.val], train[-cfg.val:]
        if cfg.slips:  # the sloppy teacher's D_syn (validation and test keep their golds: only solutions change)
            train = with_slips(train, cfg.slips)
        test = load_problems(cfg.test, cfg.n_test)
    except (ValueError, FileNotFoundError) as e:  # bad input: one clear line, not a traceback
        raise SystemExit(f"error: {e}") from None
    check_out_folder(cfg)
    if cfg.mode == "bench_rollouts":
        return bench_rollouts(cfg, train)
    if cfg.mode == "bench_dpo":
        return bench_dpo(cfg)
    if cfg.mode == "bench_shapes":
        return bench_shapes(cfg, train)
    if cfg.mode == "eval":
        path = cfg.init or f"{cfg.out}/sft/model"
        if not cfg.init and not os.path.exists(path):
            raise SystemExit(f"error: {path}: no SFT model to evaluate; run --mode sft with this --out first, or give --init")
        run_eval(cfg, test, "init" if cfg.init else "sft", path)
        return
    if cfg.mode == "scaling":
        run_scaling(cfg, train, test, val)
        return
    if cfg.mode == "synth":
        run_synth(cfg, train)
        return
    stages = {"rft": ["rft"], "dpo": ["dpo"], "per_step": ["per_step"], "all": ["rft", "dpo", "per_step"]}.get(cfg.mode, [])
    if cfg.task == "star" and cfg.mode == "all":  # the star graph's picture: per-step DPO on the true pits too
        stages.append("per_step_oracle")
    if cfg.seeds > 1:
        run_seeds(cfg, train, test, stages, val)
        return
    run_pipeline(cfg, train, test, stages, val)


def _stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a scheduler pre-empting the job) takes the same path as Ctrl-C


def cli(argv=None):
    """main() as a command: Ctrl-C or SIGTERM (a scheduler pre-empting the job) stops cleanly and says how to resume."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        main(argv)
    except KeyboardInterrupt:
        # finished batches are on disk (the batch in flight is abandoned), training has its last checkpoint
        args = sys.argv[1:] if argv is None else argv
        print("\ninterrupted; everything finished so far is saved. Resume with the same command:\n  python "
              f"{os.path.relpath(__file__)} {shlex.join(args)}", file=sys.stderr)
        sys.exit(130)
    except FloatingPointError as e:  # a non-finite loss: stop, keep the last good checkpoint
        sys.exit(f"error: {e}. The last checkpoint before it (the stage's train_state.pt) is kept.")
    except WriteFailed as e:  # a full disk, mid-stage: what is written whole is kept, nothing half-written is done
        args = sys.argv[1:] if argv is None else argv
        sys.exit(f"error: could not write {e.filename}: {e.strerror}. Everything finished before it is kept and "
                 "nothing half-written is marked done; fix the cause (free space) and rerun the same command:\n"
                 f"  python {os.path.relpath(__file__)} {shlex.join(args)}")


if __name__ == "__main__":
    cli()
