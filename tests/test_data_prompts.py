"""The broad prompt set: thousands of distinct prompts, every topic, task and length used, deterministic,
nothing taken from the Python standard library's documentation."""
from collections import Counter

from lbsearch.corpus.prompt_data import LENGTHS, TASKS, TOPICS
from lbsearch.corpus.prompts import PROMPT_SETS, broad_prompts, prompt_set_key


def test_broad_prompt_set_is_large_distinct_and_covers_every_topic_task_and_length():
    prompts = broad_prompts()
    texts = [p.text for p in prompts]
    topics = [t for ts in TOPICS.values() for t in ts]
    assert len(prompts) == len(topics) * len(TASKS) * len(LENGTHS) >= 5000
    assert len(set(texts)) == len(texts)  # every prompt distinct: each is its own group
    assert len(set(topics)) == len(topics) >= 100 and len(TOPICS) >= 10
    assert {p.topic for p in prompts} == set(topics)
    assert set(Counter(p.task for p in prompts)) == set(TASKS) and len(TASKS) >= 12
    assert set(Counter(p.length for p in prompts)) == set(LENGTHS) == {"short", "medium", "long"}
    assert all(p.topic in p.text and "{" not in p.text for p in prompts)  # every slot filled
    # the phrasings vary within a task: each task uses more than one of its wordings (where it has several)
    for task, phrasings in TASKS.items():
        heads = {p.text.split(p.topic)[0] for p in prompts if p.task == task}
        assert len(heads) > 1 or len(phrasings) == 1, task


def test_broad_prompt_set_is_deterministic():
    again = broad_prompts.__wrapped__()  # built anew, not the cached tuple
    assert again == broad_prompts()
    assert prompt_set_key("broad") == prompt_set_key("broad") and prompt_set_key("broad") != prompt_set_key("seed")
    assert len(PROMPT_SETS["seed"]()) == 32


def test_no_prompt_comes_from_the_standard_library_docs():
    from lbsearch.data import python_docs

    docs = "\n".join(python_docs())
    assert not [p.text for p in broad_prompts() if p.text in docs]
    phrasings = [t.split("{")[0] for ts in TASKS.values() for t in ts if len(t.split("{")[0]) > 25]
    assert not [t for t in phrasings if t in docs]
