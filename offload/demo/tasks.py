"""Verifiable reasoning tasks for the bundled demo model (offload/demo), as conversations of 1-4 turns.

Every turn is a short user question with one exact assistant reply that a user can check by hand; later
turns are new, independent questions in the same chat, so the model must answer the LAST user message. A
reply restates the arithmetic it does ("34+93=127") whatever the phrasing of the question ("Add 34 and
93", "What is 34 + 93?"), so the last number of a reply is its answer. Generation is deterministic:
`make_task(random.Random(seed))` always gives the same stream.

Kinds (ranges kept small for a 6-layer model trained ~40 minutes on two CPU cores; per-kind accuracy of the
shipped checkpoint: docs/demo_model.md):
    add      a + b, a and b in 0..99                         "What is 34 + 93?"         -> "34+93=127"
    sub      a - b, 0 <= b <= a <= 99 (never negative)       "Subtract 34 from 93."     -> "93-34=59"
    mul      a * b, a in 2..9, b in 2..12 (either order)     "What is 7 times 12?"      -> "7*12=84"
             (a 3-digit operand in add/sub/mul gets REFUSAL: "What is 123+456?" -> "I only handle 2-digit
             numbers." rather than a silently wrong sum)
    compare  larger / smaller of two numbers in 0..999       "Which is bigger, 482 or 428?" -> "482"
    sort     3-4 numbers of 1-2 digits, either order         "Sort 42, 7, 19"           -> "7, 19, 42"
    count    occurrences of a word in a list of 3-8 words     "How many times does apple appear in:
             (0-5 times), or of a letter in a word (spelled   pear apple plum apple?"
             out "b a n a n a", or written whole for a list   -> "pear apple(1) plum apple(2) = 2"
             of common words)                                "How many letters a in banana?"
                                                             -> "b a(1) n a(2) n a(3) = 3"
    word     one-step word problems: buys / gives away (numbers 1..30), boxes of items (2..9 x 2..9),
             sharing equally (exact division, quotient 1..9)  "Tom has 5 apples and buys 3 more. How many
                                                              apples does Tom have now?" -> "5+3=8"
    chain    2-3 operations (add/subtract 1..20, multiply by 2 or 3) from a start in 1..20, every
             intermediate in 0..60                           "Start with 7, add 5, then multiply by 2."
                                                             -> "7+5=12, 12*2=24"

Phrasings. Each kind's question is a FRAME filled with a FORM ("What's {e}?" with "{a} + {b}"; "Sort
{l}" with "42 7 19"). A few (frame, form) pairs per kind are never trained (`UNSEEN`): every frame and
every form is seen in training, only those combinations are new. `unseen(n)` draws only those pairs; it
measures whether the model understood the phrasings rather than memorised them.

Held-out splits. A fixed tenth of every kind's question space, chosen by a hash of the question text
(`is_heldout`), is never trained; `heldout(n)` (first turns), `heldout_conversations(n)` (2-4 turns) and
`unseen(n)` draw from their own seeds, none of them the training seed. A split by a hash holds out the
same share of small spaces (the times table, letter counts) and large ones (sums, sorts).
"""
from __future__ import annotations

import random
import string
import zlib

KINDS = ("add", "sub", "mul", "compare", "sort", "count", "word", "chain")
# Sampling weights: the carry-heavy arithmetic gets the most practice.
WEIGHTS = (3, 3, 3, 1, 2, 2, 2, 2)
TURN_WEIGHTS = (4, 3, 2, 1)  # 1, 2, 3 or 4 turns in a training conversation
HELDOUT_SEED = 20_240_917
CONVERSATION_SEED = HELDOUT_SEED + 2
UNSEEN_SEED = HELDOUT_SEED + 3
HELDOUT_SHARE = 10  # one question in HELDOUT_SHARE is held out
REFUSAL = "I only handle 2-digit numbers."
REFUSAL_RATE = 0.1  # share of add/sub/mul questions with a 3-digit operand
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a careful math tutor.", "Answer briefly.")
SYSTEM_RATE = 0.1

NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Zoe", "Max", "Eva", "Ben", "Ivy")
ITEMS = ("apples", "pears", "books", "coins", "cards", "pens", "eggs", "stickers", "marbles", "cookies")
WORDS = ("apple", "pear", "plum", "fig", "lime", "kiwi", "cat", "dog", "bird", "fish", "red", "blue")
LETTER_WORDS = ("banana", "apple", "letter", "coffee", "pepper", "balloon", "mississippi", "committee",
                "bookkeeper", "assessment", "cucumber", "strawberry", "raspberry", "parallel", "seventeen",
                "tomorrow", "success", "address", "banner", "rabbit")

# ------------------------------------------------------------------------------------------ phrasings
ARITH_FRAMES = ("What is {e}?", "What's {e}?", "what is {e}", "{e}=?", "{e} = ?", "{e}", "Compute {e}.",
                "Calculate {e}", "Please compute {e}.")
ARITH_FORMS = {"+": ("{a}+{b}", "{a} + {b}", "{a} plus {b}"),
               "-": ("{a}-{b}", "{a} - {b}", "{a} minus {b}"),
               "*": ("{a}*{b}", "{a} * {b}", "{a} times {b}", "{a} x {b}")}
# Sentences that name the operation instead of writing it (ARITH_FRAMES index len(ARITH_FRAMES) + i).
ARITH_VERBS = {"+": ("Add {a} and {b}.", "Add {a} and {b}", "Add {a} to {b}.", "What is the sum of {a} and {b}?",
                     "Please add {a} and {b}."),
               "-": ("Subtract {b} from {a}.", "Subtract {b} from {a}", "What is the difference between {a} and {b}?",
                     "Take {b} away from {a}.", "Please subtract {b} from {a}."),
               "*": ("Multiply {a} by {b}.", "Multiply {a} and {b}", "What is the product of {a} and {b}?",
                     "Please multiply {a} by {b}.")}
COMPARE_FRAMES = ("Which is {w}, {a} or {b}?", "Which is {w}: {a} or {b}?", "Which number is {w}, {a} or {b}?",
                  "What is the {w} of {a} and {b}?", "Which one is {w}, {a} or {b}?")
COMPARE_WORDS = (("larger", max), ("bigger", max), ("greater", max), ("smaller", min), ("lower", min))
SORT_FRAMES = (("Sort ascending: {l}", False), ("Sort descending: {l}", True), ("Sort {l}", False),
               ("Sort: {l}", False), ("Sort these numbers: {l}", False), ("Sort from smallest to largest: {l}", False),
               ("Sort from largest to smallest: {l}", True), ("Sort {l} in descending order.", True),
               ("Sort {l} in ascending order.", False), ("Put {l} in order.", False))
SORT_FORMS = (", ", " ", ",")  # how the numbers are separated in the question
WORD_COUNT_FRAMES = ("How many times does {t} appear in: {xs}?", "How many times does {t} appear in {xs}?",
                     "Count {t} in: {xs}", "How many {t} in: {xs}?")
WORD_COUNT_FORMS = (" ", ", ")
LETTER_FRAMES = ("How many times does the letter {c} appear in {w}?", "How many letters {c} in {w}?",
                 "How many {c}'s are in {w}?", "Count the letter {c} in {w}.", "How many times does {c} appear in {w}?")
LETTER_FORMS = ("spelled", "whole")  # "b a n a n a" or "banana" (whole words only from LETTER_WORDS)
WORD_STORIES = {
    "+": (("{n} has {a} {i} and buys {b} more.", "{n} has {a} {i} and gets {b} more.",
           "{n} had {a} {i}, then bought {b} more."),
          ("How many {i} does {n} have now?", "How many {i} now?", "How many does {n} have?")),
    "-": (("{n} has {a} {i} and gives away {b}.", "{n} has {a} {i} and loses {b}.",
           "{n} had {a} {i}, then gave away {b}."),
          ("How many {i} does {n} have left?", "How many {i} are left?", "How many does {n} have left?")),
    "*": (("{n} has {a} boxes with {b} {i} in each box.", "{n} has {a} bags with {b} {i} in each bag.",
           "{n} buys {a} packs of {b} {i}."),
          ("How many {i} is that in total?", "How many {i} in total?", "How many {i} does {n} have?")),
    "/": (("{n} shares {a} {i} equally among {b} friends.", "{n} splits {a} {i} equally between {b} friends.",
           "{n} gives {a} {i} to {b} friends, the same number each."),
          ("How many {i} does each friend get?", "How many does each friend get?", "How many {i} each?")),
}
CHAIN_STARTS = ("Start with {x}, {ops}.", "Start at {x}, {ops}.", "Begin with {x}, {ops}.", "Take {x}, {ops}.")
CHAIN_JOINS = (", then ", ", ", " and then ")

# The (frame, form) pairs never trained, per kind (frame and form indices as in the tables above; for add,
# sub and mul a frame index past ARITH_FRAMES is a verb sentence, whose form is always 0; for word, the
# frame is 3 * operation (+ - * /) + sentence and the form the question).
UNSEEN: dict[str, frozenset[tuple[int, int]]] = {
    "add": frozenset({(7, 1), (1, 2), (5, 2), (len(ARITH_FRAMES) + 4, 0)}),
    "sub": frozenset({(6, 1), (1, 0), (3, 2), (len(ARITH_FRAMES) + 4, 0)}),
    "mul": frozenset({(1, 2), (6, 1), (4, 3), (len(ARITH_FRAMES) + 3, 0)}),
    "compare": frozenset({(1, 1), (2, 4), (3, 2), (4, 0)}),
    "sort": frozenset({(4, 1), (6, 2), (7, 1), (3, 2)}),
    "count-word": frozenset({(2, 1), (3, 0)}),
    "count-letter": frozenset({(3, 1), (1, 0)}),
    "word": frozenset({(0, 2), (4, 1), (8, 0), (10, 2)}),  # story index = 3 * op + sentence
    "chain": frozenset({(1, 2), (3, 0)}),
}


def _pick(rng: random.Random, kind: str, n_frames: int, n_forms: int, unseen: bool) -> tuple[int, int]:
    """A (frame, form) pair: one of the kind's UNSEEN pairs if `unseen`, else any other."""
    if unseen:
        return rng.choice(sorted(UNSEEN[kind]))
    while True:
        pair = (rng.randrange(n_frames), rng.randrange(n_forms))
        if pair not in UNSEEN[kind]:
            return pair


def _num(rng: random.Random, max_digits: int) -> int:
    """A number whose digit count is uniform in 1..max_digits (so short numbers are not rare)."""
    d = rng.randint(1, max_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


def _arith(rng: random.Random, kind: str, op: str, a: int, b: int, result: int, unseen: bool) -> tuple[str, str]:
    """Phrase a op b; operands of 3 digits get REFUSAL."""
    verbs = ARITH_VERBS[op]
    while True:  # a verb sentence has no form: (frame, 0) says whether it is trained
        frame, form = _pick(rng, kind, len(ARITH_FRAMES) + len(verbs), len(ARITH_FORMS[op]), unseen)
        if unseen or frame < len(ARITH_FRAMES) or (frame, 0) not in UNSEEN[kind]:
            break
    if frame >= len(ARITH_FRAMES):
        question = verbs[frame - len(ARITH_FRAMES)].format(a=a, b=b)
    else:
        question = ARITH_FRAMES[frame].format(e=ARITH_FORMS[op][form].format(a=a, b=b))
    if max(a, b) >= 100:
        return question, REFUSAL
    return question, f"{a}{op}{b}={result}"


def _big(rng: random.Random) -> bool:
    return rng.random() < REFUSAL_RATE


def _add(rng, unseen=False):
    a, b = _num(rng, 2), _num(rng, 2)
    if _big(rng):
        a, b = (rng.randint(100, 999), _num(rng, 3)) if rng.random() < 0.5 else (_num(rng, 3), rng.randint(100, 999))
    return _arith(rng, "add", "+", a, b, a + b, unseen)


def _sub(rng, unseen=False):
    a, b = _num(rng, 2), _num(rng, 2)
    if _big(rng):
        a, b = rng.randint(100, 999), _num(rng, 3)
    a, b = max(a, b), min(a, b)
    return _arith(rng, "sub", "-", a, b, a - b, unseen)


def _mul(rng, unseen=False):
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    if _big(rng):
        b = rng.randint(100, 999)
    if rng.random() < 0.5:
        a, b = b, a
    return _arith(rng, "mul", "*", a, b, a * b, unseen)


def _compare(rng, unseen=False):
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
    frame, form = _pick(rng, "compare", len(COMPARE_FRAMES), len(COMPARE_WORDS), unseen)
    word, pick = COMPARE_WORDS[form]
    return COMPARE_FRAMES[frame].format(w=word, a=a, b=b), str(pick(a, b))


def _sort(rng, unseen=False):
    xs = [_num(rng, 2) for _ in range(rng.randint(3, 4))]  # one digit or two alike: `Sort 9, 2, 7` is common
    frame, form = _pick(rng, "sort", len(SORT_FRAMES), len(SORT_FORMS), unseen)
    text, descending = SORT_FRAMES[frame]
    return text.format(l=SORT_FORMS[form].join(map(str, xs))), ", ".join(map(str, sorted(xs, reverse=descending)))


def _count(rng, unseen=False):
    if rng.random() < 0.5:
        frame, form = _pick(rng, "count-word", len(WORD_COUNT_FRAMES), len(WORD_COUNT_FORMS), unseen)
        target = rng.choice(WORDS)
        n = rng.randint(3, 8)
        k = rng.randint(0, min(5, n))
        others = [w for w in WORDS if w != target]
        xs = [target] * k + [rng.choice(others) for _ in range(n - k)]
        rng.shuffle(xs)
        question = WORD_COUNT_FRAMES[frame].format(t=target, xs=WORD_COUNT_FORMS[form].join(xs))
        return question, _tally(xs, target)
    frame, form = _pick(rng, "count-letter", len(LETTER_FRAMES), len(LETTER_FORMS), unseen)
    whole = LETTER_FORMS[form] == "whole"
    word = rng.choice(LETTER_WORDS) if whole or rng.random() < 0.5 else _letters(rng)
    letter = rng.choice(sorted(set(word)) + ["z", "x"] if rng.random() < 0.1 else sorted(set(word)))
    shown = word if whole else " ".join(word)
    return LETTER_FRAMES[frame].format(c=letter, w=shown), _tally(word, letter)


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


def _word(rng, unseen=False):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    story, question = _pick(rng, "word", 12, 3, unseen)
    op = "+-*/"[story // 3]
    if op == "+":
        a, b = rng.randint(1, 30), rng.randint(1, 30)
        answer = f"{a}+{b}={a + b}"
    elif op == "-":
        a = rng.randint(2, 30)
        b = rng.randint(1, a)
        answer = f"{a}-{b}={a - b}"
    elif op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        answer = f"{a}*{b}={a * b}"
    else:
        b, c = rng.randint(2, 9), rng.randint(1, 9)
        a = b * c
        answer = f"{a}/{b}={c}"
    sentences, questions = WORD_STORIES[op]
    q = f"{sentences[story % 3]} {questions[question]}".format(n=name, i=item, a=a, b=b)
    return q, answer


def _chain(rng, unseen=False):
    frame, form = _pick(rng, "chain", len(CHAIN_STARTS), len(CHAIN_JOINS), unseen)
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
            return CHAIN_STARTS[frame].format(x=start, ops=CHAIN_JOINS[form].join(words)), ", ".join(steps)


_MAKERS = {"add": _add, "sub": _sub, "mul": _mul, "compare": _compare, "sort": _sort, "count": _count,
           "word": _word, "chain": _chain}


def make_task(rng: random.Random, kind: str | None = None, unseen: bool = False) -> tuple[str, str]:
    """One (question, answer) pair; `kind` picks a task family, else one is drawn by WEIGHTS; `unseen` draws
    a phrasing from the kind's UNSEEN pairs (never trained)."""
    kind = kind or rng.choices(KINDS, WEIGHTS)[0]
    return _MAKERS[kind](rng, unseen)


def make_tasks(rng: random.Random, n: int, weights: tuple[float, ...] = WEIGHTS,
               unseen: bool = False) -> list[tuple[str, str, str]]:
    """n (kind, question, answer) triples, kinds drawn by `weights` (the evaluation mix unless a trainer
    asks for another)."""
    out = []
    for _ in range(n):
        kind = rng.choices(KINDS, weights)[0]
        out.append((kind, *_MAKERS[kind](rng, unseen)))
    return out


def is_heldout(question: str) -> bool:
    """Whether `question` belongs to the held-out split (a fixed hash of its text)."""
    return zlib.crc32(question.encode()) % HELDOUT_SHARE == 0


def make_conversation(rng: random.Random, weights: tuple[float, ...] = WEIGHTS, turns: int | None = None,
                      heldout_only: bool = False) -> tuple[str | None, list[tuple[str, str, str]]]:
    """(system prompt or None, [(kind, question, answer)] * turns): a chat of independent questions. The
    training stream (heldout_only=False) never contains a held-out question; heldout_only=True draws only
    held-out ones."""
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < SYSTEM_RATE else None
    n = turns or rng.choices(range(1, len(TURN_WEIGHTS) + 1), TURN_WEIGHTS)[0]
    out = []
    while len(out) < n:
        item = make_tasks(rng, 1, weights)[0]
        if is_heldout(item[1]) == heldout_only:
            out.append(item)
    return system, out


def messages(system: str | None, turns: list[tuple[str, str, str]], replies: list[str] | None = None) -> list[dict]:
    """Chat messages of a conversation up to its last question (the assistant turns before it are
    `replies` when given, e.g. the model's own, else the reference answers)."""
    out = [{"role": "system", "content": system}] if system else []
    for i, (_, q, a) in enumerate(turns):
        out.append({"role": "user", "content": q})
        if i < len(turns) - 1:
            out.append({"role": "assistant", "content": replies[i] if replies else a})
    return out


def _distinct(n: int, seed: int, draw) -> list:
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        item = draw(rng)
        key = repr(item)
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def heldout(n: int = 500, seed: int = HELDOUT_SEED) -> list[tuple[str, str, str]]:
    """First turns: n (kind, question, answer) triples with distinct held-out questions in trained
    phrasings, drawn in order from a fixed seed (a trainer drops every held-out question)."""
    def draw(rng):
        while True:
            item = make_tasks(rng, 1)[0]
            if is_heldout(item[1]):
                return item
    return _distinct(n, seed, draw)


def heldout_conversations(n: int = 200, seed: int = CONVERSATION_SEED) -> list[tuple[str | None, list]]:
    """n conversations of 2-4 held-out questions (the later-turn evaluation: turns 2.. of each)."""
    return _distinct(n, seed, lambda rng: make_conversation(rng, turns=rng.randint(2, 4), heldout_only=True))


def unseen(n: int = 500, seed: int = UNSEEN_SEED) -> list[tuple[str, str, str]]:
    """n distinct single-turn (kind, question, answer) triples in phrasings never trained (UNSEEN)."""
    return _distinct(n, seed, lambda rng: make_tasks(rng, 1, unseen=True)[0])


def normalize(text: str) -> str:
    return " ".join(text.strip().split())


def is_correct(prediction: str, answer: str) -> bool:
    """Exact match of the whole reply after collapsing whitespace."""
    return normalize(prediction) == normalize(answer)


def final_answer(reply: str) -> str:
    """The checkable answer of a reply: the text after the last '=', or the whole reply (compare, sort)."""
    return normalize(reply.rsplit("=", 1)[-1])
