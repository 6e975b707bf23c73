"""Calibration inputs: built-in captions and class ids, prompt files, and their hash.

The held-out evaluation lists share nothing with the calibration lists, so a plan
is never judged on what it was searched on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from planner.errors import bad_input

CAPTIONS: tuple[str, ...] = (
    "A red fox curled up asleep in fresh snow at the edge of a pine forest",
    "A crowded night market in the rain, neon signs reflected in puddles",
    "Close-up portrait of an elderly fisherman with a weathered face and a wool cap",
    "A bowl of ramen with a soft-boiled egg, scallions and steam rising",
    "An astronaut riding a bicycle across a salt flat at sunset",
    "A watercolor painting of a lighthouse on a rocky coast during a storm",
    "Two children flying a kite on a windy hill under a cloudy sky",
    "A vintage red convertible parked in front of a pastel-colored diner",
    "A macro photograph of a dewdrop on a green leaf with a blurred background",
    "The interior of a gothic cathedral with light streaming through stained glass",
    "A herd of elephants crossing a dusty savanna at golden hour",
    "A cozy reading nook with an armchair, a lamp and shelves full of books",
    "A futuristic city skyline with flying cars and glass towers at dawn",
    "A tabby cat sitting on a windowsill watching birds outside",
    "A plate of sushi arranged neatly on a wooden board",
    "A snowy mountain range reflected in a still alpine lake",
    "An oil painting of a sunflower field in the style of the post-impressionists",
    "A steam locomotive crossing a stone viaduct through a misty valley",
    "A golden retriever puppy chewing a blue rubber ball on a lawn",
    "A street musician playing a saxophone under a bridge at night",
    "A hot air balloon floating over a patchwork of farm fields",
    "A bustling harbor with colorful fishing boats and seagulls",
    "A minimalist living room with white walls, a gray sofa and a potted plant",
    "A medieval knight in shining armor standing in a foggy forest",
    "A slice of strawberry cake on a porcelain plate next to a cup of tea",
    "A coral reef teeming with tropical fish in clear turquoise water",
    "A pencil sketch of an old town square with a clock tower",
    "A desert road stretching toward distant mesas under a vast blue sky",
    "A barn owl perched on a fence post in the moonlight",
    "A chef tossing vegetables in a flaming wok in a busy kitchen",
    "A field of lavender in Provence with a stone farmhouse",
    "A robot watering plants in a sunny greenhouse",
)

EVAL_CAPTIONS: tuple[str, ...] = (
    "A lone sailboat on a calm sea beneath a pink evening sky",
    "A black-and-white photograph of a jazz band on a small stage",
    "A stack of pancakes with blueberries and maple syrup",
    "A tiger drinking from a jungle stream",
    "A snow-covered cabin with smoke rising from the chimney",
    "A bicycle leaning against a brick wall covered in ivy",
    "An aerial view of a winding river through autumn forests",
    "A ceramic vase of tulips on a wooden kitchen table",
    "A subway train arriving at a tiled underground station",
    "A panda eating bamboo in a misty bamboo grove",
    "A lighthouse keeper reading by lantern light",
    "A glass of iced lemonade on a sunny porch",
    "A pixel-art castle on a floating island",
    "A farmer driving a tractor through a wheat field at dusk",
    "A hummingbird hovering beside a red hibiscus flower",
    "A rainy window with city lights blurred behind it",
)

# ImageNet class ids, varied across animals, objects and scenes.
CLASS_IDS: tuple[int, ...] = (207, 360, 387, 974, 88, 979, 417, 279)
EVAL_CLASS_IDS: tuple[int, ...] = (1, 33, 94, 130, 250, 291, 409, 430, 511, 812, 933, 980)


def read_prompts(path: Path) -> list[str]:
    """One caption per non-empty line of a UTF-8 text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise bad_input(f"prompts: cannot read {str(path)!r}: {reason}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise bad_input(f"prompts: {str(path)!r} holds no prompt")
    return prompts


def take(inputs: list[str] | list[int], count: int | None, what: str) -> list:
    """The first ``count`` inputs (all of them when ``count`` is ``None``)."""
    if count is None:
        return list(inputs)
    if count > len(inputs):
        raise bad_input(f"num_prompts: asks for {count} {what}, only {len(inputs)} are given")
    return list(inputs[:count])


def inputs_hash(inputs: list[str] | list[int]) -> str:
    """sha256 of the calibration inputs, one per line, in order."""
    return hashlib.sha256("\n".join(map(str, inputs)).encode()).hexdigest()
