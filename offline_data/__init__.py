"""Embedded multi-domain benchmarks built from packages that registries ship.

Imported by both the vendor (to build its demo teacher on the private split) and the client (to
build its benchmark); it imports neither. Public surface:

- :data:`BENCHMARKS` / :func:`get_benchmark` - the registry of benchmark names;
- :func:`build_benchmark` - write a split in DomainBed layout, returns a :class:`BuildReport`;
- :func:`ensure_benchmark` - the same, unless a finished build is already there;
- :func:`iter_samples` - the same pictures in memory, with captions;
- :data:`DOMAINS`, :data:`FASHION_CLASSES`, :func:`captions_for`, :func:`class_prompt` - the
  domain, class and caption vocabulary the teacher builder needs;
- :data:`CONCEPT_SETS` / :func:`concept_samples` - held-out everyday-concept test sets;
- :func:`picture_grid` - a PNG of every domain x class.
"""

from .builder import BuildReport, Sample, build_benchmark, ensure_benchmark, iter_samples
from .captions import captions_for, class_prompt
from .classes import FASHION_CLASSES, ClassInfo
from .concepts import CONCEPT_SETS, ConceptSet, concept_samples
from .domains import DOMAINS, Domain
from .errors import InvalidArgumentError, MissingSourceError, OfflineDataError, OutputNotWritableError, UnknownNameError
from .grid import picture_grid
from .registry import BENCHMARKS, SPLITS, BenchmarkSpec, get_benchmark

__all__ = [
    "BENCHMARKS", "SPLITS", "BenchmarkSpec", "get_benchmark", "BuildReport", "Sample", "build_benchmark", "ensure_benchmark",
    "iter_samples", "captions_for", "class_prompt", "FASHION_CLASSES", "ClassInfo", "DOMAINS", "Domain",
    "CONCEPT_SETS", "ConceptSet", "concept_samples", "picture_grid", "OfflineDataError", "UnknownNameError",
    "MissingSourceError", "OutputNotWritableError", "InvalidArgumentError",
]
