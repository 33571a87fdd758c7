"""ImageNet class names (timm ships them) turned into captions for the teacher's ImageNet pairs."""

from __future__ import annotations

from functools import lru_cache

TEMPLATES: tuple[str, ...] = ("a photo of a {}", "a picture of a {}", "a close-up photo of the {}",
                              "a {}", "an image of a {}")


@lru_cache(maxsize=1)
def imagenet_names() -> tuple[tuple[str, ...], ...]:
    """Per ImageNet class, its synonyms ("tabby", "tabby cat") in timm's label order."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(tuple(s.strip() for s in info.index_to_description(i).split(",") if s.strip())
                 for i in range(info.num_classes()))


def imagenet_captions(templates: int = len(TEMPLATES), synonyms: bool = True) -> list[list[str]]:
    """Captions per class: each synonym (or the first name only) in the first ``templates`` templates."""
    return [[t.format(name) for name in (names if synonyms else names[:1]) for t in TEMPLATES[:templates]]
            for names in imagenet_names()]
