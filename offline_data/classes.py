"""Class vocabulary: folder names, natural-language names and synonyms for captions.

Folder names are what a DomainBed reader shows a client (``ankle_boot`` -> "ankle boot" in a
prompt); synonyms are what the vendor's captions may say instead, so the teacher learns the
concept rather than one string.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ClassInfo:
    """One class: its folder name, the name prompts use, and caption synonyms."""

    key: str
    name: str
    synonyms: tuple[str, ...]


#: Fashion-MNIST's ten classes in label order (label i is FASHION_CLASSES[i]).
FASHION_CLASSES: tuple[ClassInfo, ...] = (
    ClassInfo("t_shirt", "t-shirt", ("t-shirt", "tee shirt", "short-sleeved top")),
    ClassInfo("trouser", "trouser", ("pair of trousers", "pair of pants", "pair of slacks")),
    ClassInfo("pullover", "pullover", ("pullover", "sweater", "jumper")),
    ClassInfo("dress", "dress", ("dress", "summer dress", "frock")),
    ClassInfo("coat", "coat", ("coat", "jacket", "overcoat")),
    ClassInfo("sandal", "sandal", ("sandal", "open-toed sandal", "summer sandal")),
    ClassInfo("shirt", "shirt", ("shirt", "button-up shirt", "long-sleeved shirt")),
    ClassInfo("sneaker", "sneaker", ("sneaker", "running shoe", "trainer shoe")),
    ClassInfo("bag", "bag", ("bag", "handbag", "purse")),
    ClassInfo("ankle_boot", "ankle boot", ("ankle boot", "boot", "leather boot")),
)
