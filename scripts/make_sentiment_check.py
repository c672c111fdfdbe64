"""Write a second short-answer task, kept aside from tuning: review sentiment, 3 balanced classes, one-word answers.

Written by a helper that did not see the toolkit (2026-12-03; put into tables since, writing the same bytes), to
check the defaults tuned on data/region/ on a task they were not tuned on (docs/training.md#a-task-kept-aside).
Standard library only, seed 7, deterministic:

    python scripts/make_sentiment_check.py --out /tmp/heldout   # train/test .jsonl (messages) and _pc.jsonl

405 training rows and 90 held out; the prompt ends in "Sentiment:", the completion is " positive" etc.
"""

import argparse
import random
from pathlib import Path

from make_demo_data import write_both_forms  # scripts/ is on the path of a script run from it

rng = random.Random(7)

PRODUCTS = [
    "headphones",
    "blender",
    "laptop",
    "coffee maker",
    "backpack",
    "phone case",
    "vacuum cleaner",
    "desk lamp",
    "pair of running shoes",
    "kettle",
    "keyboard",
    "toaster",
    "water bottle",
    "office chair",
    "smartwatch",
    "air fryer",
    "mattress",
    "jacket",
    "charger",
    "tent",
    "printer",
    "frying pan",
    "speaker",
    "monitor",
]
SERVICES = [
    "delivery service",
    "hotel stay",
    "haircut",
    "repair shop",
    "restaurant",
    "customer support",
    "car rental",
    "cleaning service",
    "gym membership",
    "food delivery",
    "dentist visit",
    "plumber",
    "taxi ride",
    "streaming service",
    "bike shop",
    "cafe",
]
NOUNS = PRODUCTS + SERVICES

POS_ADJ = [
    "great",
    "excellent",
    "fantastic",
    "wonderful",
    "reliable",
    "impressive",
    "superb",
    "lovely",
    "outstanding",
    "solid",
    "brilliant",
    "delightful",
]
NEG_ADJ = [
    "terrible",
    "awful",
    "disappointing",
    "flimsy",
    "useless",
    "poor",
    "frustrating",
    "unreliable",
    "dreadful",
    "cheap-feeling",
    "horrible",
    "shoddy",
]
NEU_ADJ = [
    "average",
    "okay",
    "fine",
    "ordinary",
    "decent enough",
    "unremarkable",
    "acceptable",
    "standard",
    "so-so",
    "middle-of-the-road",
]
INTENS = ["really", "very", "truly", "incredibly", "absolutely", "genuinely", "quite", "so"]
MILD = ["fairly", "pretty", "more or less", "basically", "roughly", "mostly"]

POS_DETAIL = [
    "It arrived earlier than expected.",
    "Setup took two minutes.",
    "The staff were friendly and quick.",
    "Worth every penny.",
    "I would happily buy it again.",
    "My whole family loves it.",
    "It exceeded my expectations.",
    "Highly recommended.",
    "Five stars from me.",
    "I'm telling all my friends about it.",
    "The quality is obvious the moment you use it.",
    "Best purchase this year.",
]
NEG_DETAIL = [
    "It broke after a week.",
    "Nobody answered my emails.",
    "I asked for a refund.",
    "Complete waste of money.",
    "I won't be coming back.",
    "It stopped working on day two.",
    "The staff were rude and slow.",
    "Avoid if you can.",
    "One star is generous.",
    "It arrived damaged and late.",
    "I regret paying for this.",
    "Nothing worked as advertised.",
]
NEU_DETAIL = [
    "It does the job.",
    "Nothing special, nothing terrible.",
    "About what I expected for the price.",
    "It works, that's about it.",
    "Some parts are good, some less so.",
    "I have no strong feelings either way.",
    "It's fine for everyday use.",
    "Neither impressed nor disappointed.",
    "Delivery was on time, nothing more to say.",
    "Might buy again, might not.",
    "It gets the basics right.",
    "Pretty much as described.",
]


def art(n):
    return "an" if n[0] in "aeiou" else "a"


def cap(s):
    return s[0].upper() + s[1:]


POS_TEMPLATES = [
    "The {n} is {d} {a}.",
    "{D} {a} {n}, I love it.",
    "What {art} {a} {n}!",
    "I'm {d} happy with this {n}.",
    "Not bad at all, the {n} is {d} {a}.",
    "Couldn't be happier with the {n}.",
    "This {n} is not disappointing in the slightest; it's {a}.",
    "Honestly, the {n} was {d} {a}.",
    "Ten out of ten for the {n}.",
    "I had no problems at all with the {n}, it was {a}.",
]
NEG_TEMPLATES = [
    "The {n} is {d} {a}.",
    "{D} {a} {n}, I hate it.",
    "What {art} {a} {n}.",
    "I'm {d} unhappy with this {n}.",
    "The {n} was not {p} at all; it was {a}.",
    "Definitely not good, the {n} is {a}.",
    "I expected much more from the {n}.",
    "Honestly, the {n} was {d} {a}.",
    "Zero out of ten for the {n}.",
    "I would never recommend this {n}, it was {a}.",
]
NEU_TEMPLATES = [
    "The {n} is {d} {a}.",
    "{Art} {a} {n}, nothing special.",
    "The {n} does the job.",
    "Not bad, not great: the {n} is {a}.",
    "It's {art} {a} {n}, no more and no less.",
    "My experience with the {n} was {d} {a}.",
    "The {n} is neither good nor bad.",
    "I'd call the {n} {a}.",
    "Five out of ten for the {n}.",
    "The {n} was {a}, just as I expected.",
]

# label: (adjectives, degree words, whether a positive adjective is negated, templates, follow-up sentences)
CLASSES = {
    "positive": (POS_ADJ, INTENS, False, POS_TEMPLATES, POS_DETAIL),
    "negative": (NEG_ADJ, INTENS, True, NEG_TEMPLATES, NEG_DETAIL),
    "neutral": (NEU_ADJ, MILD, False, NEU_TEMPLATES, NEU_DETAIL),
}


def review(label: str) -> str:
    """One review: a templated sentence (noun, adjective, degree word) and 0-2 follow-up sentences."""
    adjectives, degrees, negated, templates, details = CLASSES[label]
    n, a, d = rng.choice(NOUNS), rng.choice(adjectives), rng.choice(degrees)
    p = rng.choice(POS_ADJ) if negated else ""
    t = rng.choice(templates).format(n=n, a=a, d=d, D=cap(d), p=p, art=art(a), Art=cap(art(a)))
    k = rng.choice([0, 1, 1, 2])
    return " ".join([t] + rng.sample(details, k))


INSTRUCTIONS = [
    "Classify the sentiment of this review as positive, negative, or neutral.",
    "Is the following review positive, negative, or neutral? Answer with one word.",
    "Read the customer review below and label its sentiment: positive, negative, or neutral.",
]
CUE = "Sentiment:"


def prompt(text):
    return f"{rng.choice(INSTRUCTIONS)}\n\nReview: {text}\n\n{CUE}"


N_TRAIN, N_TEST = 135, 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/sentiment-check")
    out = Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    train, test = [], []
    for label in CLASSES:
        pool = []
        seen = set()
        while len(pool) < N_TRAIN + N_TEST:
            r = review(label)
            if r not in seen:
                seen.add(r)
                pool.append(r)
        rng.shuffle(pool)
        train += [(r, label) for r in pool[:N_TRAIN]]
        test += [(r, label) for r in pool[N_TRAIN:]]
    rng.shuffle(train)
    rng.shuffle(test)
    for split, rows in (("train", train), ("test", test)):
        write_both_forms(out, split, [(prompt(r), label) for r, label in rows])


if __name__ == "__main__":
    main()
