"""Prompt sets for the teacher's answers: ``broad`` (topics x tasks x answer lengths, thousands of
distinct prompts, the default) and ``seed`` (the 32 hand-written prompts the corpus used first, kept
for comparisons). Each prompt is one group of the per-group split: all answers to it land in one split.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from string import Formatter

from .prompt_data import LENGTHS, SLOTS, TASKS, TOPICS

BROAD_VERSION = "broad-v1"  # bump when the way prompts are built changes (edits to the words change the hash)

# The first prompt set: 32 fixed prompts (kept as the ``seed`` set for the corpus-breadth comparison).
SEED_PROMPTS = (
    "Explain how a hash table works and when it is a poor choice.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main causes of inflation? Give examples.",
    "Describe the water cycle to a ten-year-old.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "Summarise the plot of a heist film you invent, in one paragraph.",
    "Give me five tips for staying focused while studying.",
    "How does photosynthesis turn light into chemical energy?",
    "Compare renting and buying a home: list pros and cons.",
    "Write an email asking a colleague to review a report by Friday.",
    "What is the difference between weather and climate?",
    "Explain recursion with an example in JavaScript.",
    "Describe a typical day of a medieval blacksmith.",
    "How do vaccines train the immune system?",
    "Write a haiku sequence about the four seasons.",
    "What should I pack for a three-day hiking trip?",
    "Explain the rules of chess for a complete beginner.",
    "Why is the sky blue? Give the physics.",
    "Write a product description for a solar-powered backpack.",
    "List the planets of the solar system with one fact about each.",
    "How does a bill become law in a parliamentary democracy?",
    "Explain what a neural network is without using jargon.",
    "Write a recipe for a vegetarian lasagna.",
    "What are good habits for writing maintainable code?",
    "Describe the causes and effects of the French Revolution.",
    "Explain compound interest with a numeric example.",
    "Write a dialogue between a cat and a dog about sharing a sofa.",
    "How do airplanes stay in the air?",
    "Give advice to someone starting their first job.",
    "Explain SQL joins with small example tables.",
    "Describe how the internet routes a message from one computer to another.",
    "What is the theory of evolution by natural selection?",
)


@dataclass(frozen=True)
class Prompt:
    """One prompt of a set: its text and what it was built from (topic, task, length; empty for ``seed``)."""

    text: str
    area: str = ""
    topic: str = ""
    task: str = ""
    length: str = ""


def _pick(options: tuple[str, ...], *key: str) -> str:
    """One of ``options``, chosen by a hash of ``key``: fixed for a prompt, spread over the options."""
    digest = hashlib.sha256("\x1f".join(key).encode()).digest()
    return options[int.from_bytes(digest[:4], "big") % len(options)]


def _fill(template: str, topic: str, key: tuple[str, ...]) -> str:
    names = {name for _, name, _, _ in Formatter().parse(template) if name and name != "topic"}
    return template.format(topic=topic, **{n: _pick(SLOTS[n], n, *key) for n in names})


@lru_cache(maxsize=1)
def broad_prompts() -> tuple[Prompt, ...]:
    """Every topic x task x length once, in a fixed order (area, topic, task, length); the phrasing of
    the task and of the length, and the slots, are picked per prompt by a hash, so wording varies too."""
    out = []
    for area, topics in TOPICS.items():
        for topic in topics:
            for task, phrasings in TASKS.items():
                for length, asks in LENGTHS.items():
                    key = (topic, task, length)
                    text = f"{_fill(_pick(phrasings, 'task', *key), topic, key)} {_pick(asks, 'length', *key)}"
                    out.append(Prompt(text, area, topic, task, length))
    return tuple(out)


def seed_prompts() -> tuple[Prompt, ...]:
    return tuple(Prompt(p) for p in SEED_PROMPTS)


PROMPT_SETS = {"broad": broad_prompts, "seed": seed_prompts}


def prompt_set(name: str) -> tuple[Prompt, ...]:
    return PROMPT_SETS[name]()


def prompt_set_key(name: str) -> str:
    """What names a prompt set's content in cache keys: its name, version and a hash of its texts."""
    texts = [p.text for p in prompt_set(name)]
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
    return f"{BROAD_VERSION if name == 'broad' else name}-{len(texts)}-{digest}"
