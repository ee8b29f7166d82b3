"""Write examples/chat_prompts.jsonl: a few hundred varied chat prompts for sequence-level KD.

The prompts are composed here from hand-written instruction forms and topics (no external data),
deterministically, so the file can be rebuilt and checked. Each row is
`{"messages": [{"role": "user", "content": ...}], "split": "train" | "heldout"}`; `hpd generate`
reads the messages and appends the teacher's answer. The held-out rows measure teacher-student
agreement on prompts never trained on.

    python scripts/build_chat_prompts.py            # rewrites examples/chat_prompts.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = """
the water cycle; photosynthesis; volcanoes; the moon; rainbows; gravity; the human heart; bees;
recycling; the internet; electricity; the seasons; dinosaurs; the ocean tides; clouds; sleep;
vaccines; the printing press; the pyramids of Egypt; the Roman Empire; democracy; money; maps;
coffee; bread baking; chess; football; the piano; painting with watercolors; poetry; libraries;
trees; deserts; penguins; elephants; honey; the solar system; comets; earthquakes; wind energy;
solar panels; batteries; computers; smartphones; email; passwords; friendship; kindness; time
management; exercise; healthy breakfast; drinking water; gardening; composting; camping; maps and
compasses; trains; bicycles; airplanes; bridges; lighthouses; museums; music festivals; birthdays;
cooking pasta; tea; chocolate; snow; thunderstorms; the alphabet; learning a new language;
public speaking; job interviews; saving money; reading books; writing letters; city parks
""".replace("\n", " ").split(";")

FORMS = [
    "Explain {t} to a ten-year-old in three sentences.",
    "Give me three interesting facts about {t}.",
    "Write a short poem about {t}.",
    "What is the most important thing to know about {t}?",
    "Describe {t} in one paragraph.",
    "Write a two-sentence story that involves {t}.",
    "List four words that come to mind when you think of {t}.",
    "Why do people care about {t}?",
    "Give a simple definition of {t}.",
    "What are two common misunderstandings about {t}?",
    "Write a friendly tweet about {t}.",
    "Summarize what you know about {t} in one sentence.",
    "How would you teach a friend about {t}?",
    "Write a riddle whose answer is {t}.",
    "What question would a curious child ask about {t}, and how would you answer it?",
]

STANDALONE = [
    "Hi! How are you today?", "Can you tell me a joke?", "What should I cook for dinner tonight?",
    "Suggest a name for a small grey cat.", "How do I say thank you politely in an email?",
    "Write a haiku about Monday mornings.", "Give me a tip for staying focused while studying.",
    "What is a good way to start the day?", "Recommend a hobby that costs little money.",
    "Write a short thank-you note to a teacher.", "How can I fall asleep faster?",
    "What are the primary colors?", "Name three animals that live in the Arctic.",
    "What is the difference between weather and climate?", "How many days are in a leap year?",
    "Write a motivational sentence for someone running a marathon.",
    "What is the plural of mouse?", "Give me a synonym for happy.", "What is the opposite of ancient?",
    "Rewrite this sentence more formally: gonna grab some food, brb.",
    "Correct the grammar: she don't like apples.", "Translate 'good morning' into French.",
    "What does a librarian do?", "Describe the color blue to someone who cannot see.",
    "Write a slogan for a lemonade stand.", "What are the benefits of walking every day?",
    "Plan a simple three-item picnic menu.", "What is a noun? Give two examples.",
    "Write an opening line for a mystery novel.", "How do plants drink water?",
    "Give me two ideas for a rainy afternoon.", "What makes a good friend?",
    "Explain what a recipe is.", "Write a short apology for being late to a meeting.",
    "What is the boiling point of water in Celsius?", "Name the four seasons in order.",
    "Explain why the sky looks blue.", "Write a limerick about a frog.",
    "Suggest three questions to ask at the end of a job interview.",
    "What is the largest planet in our solar system?",
]


def build(seed: int = 0, n_topic_prompts: int = 280, heldout_fraction: float = 0.15) -> list[dict]:
    rng = random.Random(seed)
    topics = [t.strip() for t in TOPICS if t.strip()]
    pairs = sorted({(f, t) for f in FORMS for t in topics})
    rng.shuffle(pairs)
    texts = [f.format(t=t) for f, t in pairs[:n_topic_prompts]] + STANDALONE
    rng.shuffle(texts)
    n_heldout = round(len(texts) * heldout_fraction)
    return [{"messages": [{"role": "user", "content": text}], "split": "heldout" if i < n_heldout else "train"}
            for i, text in enumerate(texts)]


def main() -> None:
    out = Path(__file__).resolve().parent.parent / "examples" / "chat_prompts.jsonl"
    rows = build()
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts ({sum(r['split'] == 'heldout' for r in rows)} held out) to {out}")


if __name__ == "__main__":
    main()
