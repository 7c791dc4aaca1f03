"""The words of the broad prompt set (:mod:`lbsearch.corpus.prompts` combines them): topics by area,
task phrasings, answer lengths and the small slots the phrasings name.

Written for this project. No text here comes from the Python standard library or its
documentation (that is evaluation text, ``python-docs``), and no topic is about Python's library.
Editing anything here changes the prompt set's content hash, so corpora sampled from it are drawn again.
"""
from __future__ import annotations

TOPICS: dict[str, tuple[str, ...]] = {
    "science": (
        "photosynthesis", "plate tectonics", "black holes", "the immune system", "DNA replication",
        "chemical bonds", "evolution by natural selection", "quantum entanglement", "the water cycle",
        "antibiotic resistance"),
    "history": (
        "the Roman Empire", "the Industrial Revolution", "the printing press", "the Silk Road",
        "the French Revolution", "the Apollo moon landings", "the pyramids of ancient Egypt",
        "the fall of the Berlin Wall", "the Black Death", "the Meiji Restoration"),
    "everyday life": (
        "cooking on a tight budget", "keeping houseplants alive", "moving to a new city", "morning routines",
        "decluttering a home", "commuting by public transport", "raising a puppy", "planning a birthday party",
        "getting enough sleep", "sharing a flat with roommates"),
    "technology": (
        "smartphones", "electric cars", "cloud computing", "3D printing", "satellite navigation",
        "solar panels", "password security", "machine translation", "recommendation algorithms",
        "wireless networks"),
    "arts": (
        "impressionist painting", "jazz improvisation", "the history of cinema", "Shakespeare's tragedies",
        "origami", "street photography", "classical ballet", "graphic novels", "pottery", "film music"),
    "business": (
        "inflation", "starting a small business", "global supply chains", "remote work",
        "marketing on social media", "negotiating a salary", "compound interest", "the stock market",
        "customer service", "microfinance"),
    "health": (
        "regular exercise", "a balanced diet", "mental health at work", "vaccination", "dental care",
        "the effects of caffeine", "basic first aid", "managing stress", "staying hydrated",
        "posture at a desk"),
    "geography": (
        "the Amazon rainforest", "the Sahara desert", "volcanoes", "coral reefs", "glaciers",
        "the Himalayas", "monsoons", "river deltas", "bird migration", "national parks"),
    "mathematics": (
        "prime numbers", "probability", "the Pythagorean theorem", "statistics in the news", "fractals",
        "linear equations", "graph theory", "the idea of infinity", "the golden ratio", "mental arithmetic"),
    "programming": (
        "recursion", "hash tables", "branching and merging in Git", "unit testing", "memory management in C",
        "promises in JavaScript", "ownership and borrowing in Rust", "SQL joins", "big-O notation",
        "concurrency with goroutines in Go"),
    "society": (
        "democracy", "the rule of law", "volunteering", "urban planning", "the ethics of artificial intelligence",
        "freedom of speech", "Stoic philosophy", "human rights", "public libraries", "school education"),
    "sports and hobbies": (
        "marathon running", "chess openings", "football tactics", "learning a musical instrument",
        "rock climbing", "birdwatching", "board games", "swimming technique", "the Olympic Games",
        "vegetable gardening"),
    "space and environment": (
        "climate change", "recycling", "wind power", "the Mars rovers", "the International Space Station",
        "plastic in the oceans", "loss of biodiversity", "the phases of the Moon", "exoplanets",
        "heat in cities"),
    "food": (
        "sourdough bread", "fermented foods", "spices of the world", "coffee", "vegetarian cooking",
        "street food", "chocolate making", "food waste", "tea ceremonies", "regional cheeses"),
}

# task -> phrasings; {topic} and the SLOTS below are filled in, one phrasing per (topic, task, length)
TASKS: dict[str, tuple[str, ...]] = {
    "explanation": (
        "Explain {topic} to {audience}.",
        "Give {audience} a clear explanation of {topic}.",
        "What is there to understand about {topic}? Explain it to {audience}."),
    "story": (
        "Write a short story in which {topic} plays an important part.",
        "Tell a story about {person} whose life is changed by {topic}.",
        "Write a piece of fiction set in a world shaped by {topic}."),
    "dialogue": (
        "Write a dialogue between {pair} about {topic}.",
        "Write a conversation in which {pair} discuss {topic}."),
    "code": (
        "Write a {language} program that has something to do with {topic}, and explain how it works.",
        "Show how an aspect of {topic} could be modelled in {language} code, with comments.",
        "Write a small {language} function inspired by {topic}, then walk through an example run."),
    "list": (
        "List {n} key facts about {topic}.",
        "Give a bulleted list of {n} things everyone should know about {topic}.",
        "What are {n} common misconceptions about {topic}? List them, each with a correction."),
    "reasoning": (
        "Reason step by step: why does {topic} matter, and what would change without it?",
        "Pose a tricky question about {topic}, then answer it with careful step-by-step reasoning.",
        "A friend claims that {topic} is overrated. Think it through step by step: are they right?"),
    "letter": (
        "Write an email to {recipient} about {topic}.",
        "Write a letter to {recipient} arguing that {topic} deserves more attention."),
    "summary": (
        "Summarise what is known about {topic}.",
        "Write a summary of {topic} for a busy reader.",
        "Give an overview of {topic}, ending with a one-sentence summary."),
    "questions": (
        "Write a FAQ about {topic}, with questions and answers.",
        "What do beginners usually ask about {topic}? Answer each question.",
        "Answer this question from {audience}: what should I know about {topic}?"),
    "how-to": (
        "Write a practical guide for someone who wants to learn about {topic}.",
        "Give step-by-step advice to a beginner who is curious about {topic}."),
    "comparison": (
        "Compare {topic} with a closely related subject: what do they share, and where do they differ?",
        "Describe two opposing views on {topic} and weigh them against each other."),
    "poem": (
        "Write a poem about {topic}.",
        "Write song lyrics inspired by {topic}."),
    "history": (
        "Describe how {topic} developed over time, with its key moments.",
        "Tell the history of {topic} as a sequence of turning points."),
    "teaching": (
        "Explain {topic} with an everyday analogy.",
        "Design a short lesson that teaches {topic} to {audience}, with one exercise."),
    "article": (
        "Write a blog post about {topic} for a general audience.",
        "Write a news article about a recent, imagined development related to {topic}."),
    "opinion": (
        "Argue for and against a popular opinion about {topic}.",
        "Write an opinion piece about {topic} from the point of view of {person}."),
}

# answer length asked for -> phrasings appended to the task
LENGTHS: dict[str, tuple[str, ...]] = {
    "short": ("Keep it short: two or three sentences.", "Be brief, under 80 words."),
    "medium": ("Aim for about 200 words.", "Write a few paragraphs."),
    "long": ("Be thorough and detailed: 500 words or more.", "Write a long, detailed answer."),
}

SLOTS: dict[str, tuple[str, ...]] = {
    "audience": ("a ten-year-old", "a high-school student", "a busy manager", "a university student",
                 "someone who has never heard of it", "an expert from another field"),
    "person": ("a retired teacher", "a young engineer", "a nurse on night shifts", "a farmer",
               "a shy teenager", "a travelling musician", "a shop owner"),
    "pair": ("a teacher and a curious student", "two old friends", "a sceptic and an enthusiast",
             "a grandparent and a grandchild", "a journalist and an expert"),
    "recipient": ("a colleague", "your manager", "a local newspaper", "a friend abroad",
                  "a school principal", "a city council member"),
    "language": ("Python", "JavaScript", "TypeScript", "Rust", "Go", "Java", "C", "C++", "Ruby", "SQL",
                 "Bash", "Haskell", "Kotlin", "Swift", "R", "Julia"),
    "n": ("three", "five", "seven", "ten"),
}
