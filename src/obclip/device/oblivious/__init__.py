"""Oblivious transform (device side of ObCLIP, docs/method.md section 2, step 1; the policy in
docs/privacy.md).

The user's prompt may reveal sensitive attributes (by default gender, age, ethnicity). The
device turns it into N candidate prompts that differ only in those attributes; the cloud runs
all N and cannot tell which one is real. A prompt with a word the device cannot vouch for is
never sent as typed: the device generates it alone (default) or refuses.

Modules, one concept each: schema (the attribute schema), vocabulary (the shipped vouched
words), parse (mentions and pronouns), render (a candidate from slot values), vouch (default
deny), detector (a learned token classifier on onnxruntime), transform (the whole step and its
policy), cli (obclip-candidates). Pure standard library except detector's onnxruntime.
"""

from .cli import main
from .detector import OnnxTokenClassifier
from .negative import NegativeCheck, check_negative
from .schema import DEFAULT_SCHEMA, Entry, ObliviousError, Schema, schema_file
from .transform import (
    UNPROTECTED_POLICIES,
    CandidateSet,
    ObliviousTransform,
    ProtectedSpan,
    SpanDetector,
    TransformConfig,
    describe,
)

__all__ = ["DEFAULT_SCHEMA", "UNPROTECTED_POLICIES", "CandidateSet", "Entry", "NegativeCheck", "ObliviousError",
           "ObliviousTransform", "OnnxTokenClassifier", "ProtectedSpan", "Schema", "SpanDetector",
           "TransformConfig", "check_negative", "describe", "main", "schema_file"]
