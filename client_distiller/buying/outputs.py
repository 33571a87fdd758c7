"""How the client adapts to the protection mode its key was sold (read from the ModelCard).

The vendor decides what a key receives; the client can only use it. Two outputs exist:

- ``embeddings`` (``none``, ``quantize``, ``noise``, ``truncate``, ``rotate``, ``b4b``,
  ``watermark``): class prompts and training images are bought as embeddings, in whatever dimension
  this key receives (``ModelCard.embedding_dim``), and feed VL2V-ADiP and the other
  embedding methods as before;
- ``probabilities``: no embedding ever leaves the vendor; the client sends its class names with
  each image and buys top-k class probabilities, so only methods that need nothing but class
  probabilities (``kd``, and ``erm`` which needs nothing) can train.

``OUTPUTS`` is the registry (output name -> what it provides and the methods used by default);
:func:`methods_for` turns a requested method list into a runnable one with a one-line notice.
What to buy for the chosen methods is ``policy.buy_for_methods`` (it reads the same card).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AbstractSet, Sequence

from shared.protocol import OUTPUT_EMBEDDINGS, OUTPUT_PROBABILITIES, ModelCard, OutputKind

from client_distiller.errors import UsageError


class ModeMismatch(UsageError):
    """The methods asked for need teacher outputs that this key's protection mode does not sell."""


@dataclass(frozen=True)
class OutputUse:
    """What the client can do with one kind of vendor answer (:data:`shared.protocol.OutputKind`):
    which method needs it satisfies, and the methods trained by default."""

    provides: frozenset[str]
    default_methods: tuple[str, ...]


OUTPUTS: dict[OutputKind, OutputUse] = {
    OUTPUT_EMBEDDINGS: OutputUse(frozenset({"class_texts", "images", "class_probabilities", "sentences"}),
                                  ("erm", "vl2v-adip")),
    OUTPUT_PROBABILITIES: OutputUse(frozenset({"class_probabilities"}), ("erm", "kd")),
}


def output_use(card: ModelCard) -> OutputUse:
    return output_use_named(card.output)


def output_use_named(name: str) -> OutputUse:
    if name not in OUTPUTS:
        raise ModeMismatch(f"the vendor sells {name!r} outputs, which this client cannot use "
                           f"(known: {', '.join(OUTPUTS)})")
    return OUTPUTS[name]


def methods_for(card: ModelCard, requested: Sequence[str] | None) -> tuple[list[str], str | None]:
    """The methods to run against this key and a one-line notice when they differ from the request.

    ``requested`` None means "the defaults": they follow the key's output (a probabilities key gets
    ``erm`` + ``kd``). Methods asked for explicitly that the key cannot feed are a clear error, not
    a silent substitution: the user chose them.
    """
    from client_distiller.training.methods import get_method

    kind = output_use(card)
    if requested is None:
        methods = list(kind.default_methods)
        default = list(OUTPUTS[OUTPUT_EMBEDDINGS].default_methods)
        notice = None if methods == default else (
            f"this key is in {card.protection!r} mode ({card.output} only): "
            f"training {', '.join(methods)} instead of {', '.join(default)}")
        return methods, notice
    unusable = [m for m in requested if not get_method(m).needs <= kind.provides]
    if unusable:
        raise ModeMismatch(f"this key is in {card.protection!r} mode and sells "
                           f"{card.output} only; {', '.join(unusable)} cannot train from that "
                           f"(use {', '.join(kind.default_methods)})")
    return list(requested), None


def needs_of(methods: Sequence[str]) -> AbstractSet[str]:
    """The union of the methods' teacher needs: what one shared purchase must cover."""
    from client_distiller.training.methods import get_method

    return frozenset().union(*(get_method(m).needs for m in methods))
