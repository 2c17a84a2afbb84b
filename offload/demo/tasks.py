"""Verifiable reasoning tasks for the bundled demo model (offload/demo).

Every task is a chat turn: a short user question and one exact assistant reply that a user can check by
hand. The reply restates the arithmetic it does ("34+93=127"), so the last number of a reply is its
answer. Generation is deterministic: `make_task(random.Random(seed))` always gives the same stream.

Arithmetic is written without spaces around the operators: with one token per digit, "34 + 93" puts a
bare space token before each number and copying the operands becomes a two-step lookup for a tiny model.

Kinds (ranges kept small for a 6-layer model trained ~40 minutes on two CPU cores; per-kind accuracy of the
shipped checkpoint: docs/demo_model.md):
    add      a + b, a and b in 0..99                         "What is 34+93?"           -> "34+93=127"
    sub      a - b, 0 <= b <= a <= 99 (never negative)       "What is 93-34?"           -> "93-34=59"
    mul      a * b, a in 2..9, b in 2..12 (either order)     "What is 7*12?"            -> "7*12=84"
    compare  larger / smaller of two numbers in 0..999       "Which is larger, 482 or 428?" -> "482"
    sort     3-4 numbers in 0..99, ascending or descending   "Sort ascending: 42, 7, 19" -> "7, 19, 42"
    count    occurrences of a word in a list of 3-8 words     "How many times does apple appear in:
             (0-5 times), or of a letter in a word spelled    pear apple plum apple?"
                                                             -> "pear apple(1) plum apple(2) = 2"
             out with spaces ("b a n a n a"; a real word or
             a made-up one of 4-9 letters)
    word     one-step word problems: buys more / gives away (numbers 1..30), boxes of items (2..9 x 2..9),
             sharing equally (exact division, quotient 1..9)
                                                             "Tom has 5 apples and buys 3 more. How many
                                                              apples does Tom have now?" -> "5+3=8"
    chain    2-3 operations (add/subtract 1..20, multiply by 2 or 3) from a start in 1..20, every
             intermediate in 0..60                           "Start with 7, add 5, then multiply by 2."
                                                             -> "7+5=12, 12*2=24"

The held-out split is a fixed tenth of every kind's question space, chosen by a hash of the question
text (`is_heldout`): the trainer drops those questions, `heldout(n)` draws only those. A split by a hash
(rather than "the first N evaluation questions") holds out the same share of small spaces (the times
table, letter counts) and large ones (sums, sorts) instead of swallowing the small ones whole, so every
kind is trained and every kind is tested on questions never seen.
"""
from __future__ import annotations

import random
import string
import zlib

KINDS = ("add", "sub", "mul", "compare", "sort", "count", "word", "chain")
# Sampling weights: the carry-heavy arithmetic gets the most practice.
WEIGHTS = (3, 3, 3, 1, 2, 2, 2, 2)
HELDOUT_SEED = 20_240_917
HELDOUT_SHARE = 10  # one question in HELDOUT_SHARE is held out

NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Zoe", "Max", "Eva", "Ben", "Ivy")
ITEMS = ("apples", "pears", "books", "coins", "cards", "pens", "eggs", "stickers", "marbles", "cookies")
WORDS = ("apple", "pear", "plum", "fig", "lime", "kiwi", "cat", "dog", "bird", "fish", "red", "blue")
LETTER_WORDS = ("banana", "apple", "letter", "coffee", "pepper", "balloon", "mississippi", "committee",
                "bookkeeper", "assessment", "cucumber", "strawberry", "raspberry", "parallel", "seventeen",
                "tomorrow", "success", "address", "banner", "rabbit")


def _num(rng: random.Random, max_digits: int) -> int:
    """A number whose digit count is uniform in 1..max_digits (so short numbers are not rare)."""
    d = rng.randint(1, max_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


def _add(rng):
    a, b = _num(rng, 2), _num(rng, 2)
    return f"What is {a}+{b}?", f"{a}+{b}={a + b}"


def _sub(rng):
    a, b = _num(rng, 2), _num(rng, 2)
    a, b = max(a, b), min(a, b)
    return f"What is {a}-{b}?", f"{a}-{b}={a - b}"


def _mul(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    if rng.random() < 0.5:
        return f"What is {a}*{b}?", f"{a}*{b}={a * b}"
    return f"What is {b}*{a}?", f"{b}*{a}={a * b}"


def _compare(rng):
    a = _num(rng, 3)
    b = a
    while b == a:  # near misses (same digits, one changed or swapped) are the interesting cases
        if rng.random() < 0.5:
            digits = list(str(a))
            i = rng.randrange(len(digits))
            digits[i] = str(rng.randint(1 if i == 0 and len(digits) > 1 else 0, 9))
            b = int("".join(digits))
        else:
            b = _num(rng, 3)
    if rng.random() < 0.5:
        return f"Which is larger, {a} or {b}?", str(max(a, b))
    return f"Which is smaller, {a} or {b}?", str(min(a, b))


def _sort(rng):
    xs = [rng.randint(0, 99) for _ in range(rng.randint(3, 4))]
    if rng.random() < 0.5:
        return "Sort ascending: " + ", ".join(map(str, xs)), ", ".join(map(str, sorted(xs)))
    return "Sort descending: " + ", ".join(map(str, xs)), ", ".join(map(str, sorted(xs, reverse=True)))


def _count(rng):
    if rng.random() < 0.5:
        target = rng.choice(WORDS)
        n = rng.randint(3, 8)
        k = rng.randint(0, min(5, n))
        others = [w for w in WORDS if w != target]
        xs = [target] * k + [rng.choice(others) for _ in range(n - k)]
        rng.shuffle(xs)
        return f"How many times does {target} appear in: {' '.join(xs)}?", _tally(xs, target)
    word = rng.choice(LETTER_WORDS) if rng.random() < 0.5 else _letters(rng)
    letter = rng.choice(sorted(set(word)) + ["z", "x"] if rng.random() < 0.1 else sorted(set(word)))
    return f"How many times does the letter {letter} appear in {' '.join(word)}?", _tally(word, letter)


def _tally(items, target: str) -> str:
    """Walk the items and number each match as it goes: "b a(1) n a(2) n a(3) = 3". Each step is then a
    copy and a +1 next to the last count, which a small model learns; a bare "3" asks it to count in one
    forward pass, which it does not."""
    k, out = 0, []
    for x in items:
        if x == target:
            k += 1
            out.append(f"{x}({k})")
        else:
            out.append(x)
    return f"{' '.join(out)} = {k}"


def _letters(rng: random.Random) -> str:
    """A made-up word of 4-9 letters over 3-5 distinct ones, so that letters repeat and counting, not
    memorising a word list, is what answers the question."""
    alphabet = rng.sample(string.ascii_lowercase, rng.randint(3, 5))
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(4, 9)))


def _word(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    op = rng.choice("+-*/")
    if op == "+":
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        return q, f"{a}+{b}={a + b}"
    if op == "-":
        a = rng.randint(2, 30)
        b = rng.randint(1, a)
        q = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?"
        return q, f"{a}-{b}={a - b}"
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{name} has {a} boxes with {b} {item} in each box. How many {item} is that in total?"
        return q, f"{a}*{b}={a * b}"
    b, c = rng.randint(2, 9), rng.randint(1, 9)
    a = b * c
    q = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
    return q, f"{a}/{b}={c}"


def _chain(rng):
    while True:
        x = start = rng.randint(1, 20)
        words, steps = [], []
        for _ in range(rng.randint(2, 3)):
            op = rng.choice("+-*")
            b = rng.randint(2, 3) if op == "*" else rng.randint(1, 20)
            y = x + b if op == "+" else x - b if op == "-" else x * b
            if not 0 <= y <= 60:
                break
            words.append({"+": f"add {b}", "-": f"subtract {b}", "*": f"multiply by {b}"}[op])
            steps.append(f"{x}{op}{b}={y}")
            x = y
        else:
            return f"Start with {start}, " + ", then ".join(words) + ".", ", ".join(steps)


_MAKERS = {"add": _add, "sub": _sub, "mul": _mul, "compare": _compare, "sort": _sort, "count": _count,
           "word": _word, "chain": _chain}


def make_task(rng: random.Random, kind: str | None = None) -> tuple[str, str]:
    """One (question, answer) pair; `kind` picks a task family, else one is drawn by WEIGHTS."""
    kind = kind or rng.choices(KINDS, WEIGHTS)[0]
    return _MAKERS[kind](rng)


def make_tasks(rng: random.Random, n: int, weights: tuple[float, ...] = WEIGHTS) -> list[tuple[str, str, str]]:
    """n (kind, question, answer) triples, kinds drawn by `weights` (the evaluation mix unless a trainer
    asks for another)."""
    out = []
    for _ in range(n):
        kind = rng.choices(KINDS, weights)[0]
        out.append((kind, *_MAKERS[kind](rng)))
    return out


def is_heldout(question: str) -> bool:
    """Whether `question` belongs to the held-out split (a fixed hash of its text)."""
    return zlib.crc32(question.encode()) % HELDOUT_SHARE == 0


def heldout(n: int = 500, seed: int = HELDOUT_SEED) -> list[tuple[str, str, str]]:
    """The evaluation split: n (kind, question, answer) triples with distinct held-out questions, drawn in
    order from a fixed seed (a trainer drops every held-out question, so none of these is ever trained)."""
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        kind, q, a = make_tasks(rng, 1)[0]
        if is_heldout(q) and q not in seen:
            seen.add(q)
            out.append((kind, q, a))
    return out


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match of the whole reply after collapsing whitespace."""
    return normalize(prediction) == normalize(answer)


def final_answer(reply: str) -> str:
    """The checkable answer of a reply: the text after the last '=', or the whole reply (compare, sort)."""
    return normalize(reply.rsplit("=", 1)[-1])
