"""obclip-candidates: the candidate set the cloud may see for a prompt, or an audit of a file."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .detector import OnnxTokenClassifier
from .schema import ObliviousError
from .transform import UNPROTECTED_POLICIES, ObliviousTransform, TransformConfig


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="obclip-candidates",
        description="Turn a prompt into the oblivious candidate set the cloud may see (JSON on stdout), "
                    "or audit a file of prompts (--audit FILE: JSON Lines on stdout).",
    )
    ap.add_argument("prompt", nargs="?")
    ap.add_argument("--audit", metavar="FILE", default=None,
                    help="read prompts one per line ('-' for stdin) and write one JSON line each: prompt, n, "
                         "device_only, reason, protected (spans), refused (reason or null), unprotected (words "
                         "the device could not vouch for)")
    ap.add_argument("--schema", default=None, help="attribute schema JSON (default: device/schemas/person.json)")
    ap.add_argument("--max-candidates", type=int, default=TransformConfig.max_candidates)
    ap.add_argument("--unprotected", choices=UNPROTECTED_POLICIES, default="device-only",
                    help="a word the device cannot vouch for: send nothing and generate on the device alone "
                         "(device-only, default), or refuse the prompt; unsafe-send sends it as typed "
                         "(UNSAFE: research on the rules only)")
    ap.add_argument("--detector", metavar="FOLDER", default=None,
                    help="also run a learned token classifier exported to ONNX (model.onnx, tokenizer.json, "
                         "labels.json or config.json; docs/privacy.md): it can only add protection")
    args = ap.parse_args(argv)
    if (args.prompt is None) == (args.audit is None):
        ap.error("give either a prompt or --audit FILE")
    if args.unprotected == "unsafe-send":
        print("WARNING: --unprotected unsafe-send sends words the device cannot vouch for AS TYPED: "
              "the server may learn the attributes they tell. Research use only.", file=sys.stderr)
    try:
        detector = OnnxTokenClassifier.from_folder(args.detector) if args.detector is not None else None
        config = TransformConfig(max_candidates=args.max_candidates, schema_path=args.schema,
                                 unprotected=args.unprotected, detector=detector)
        transform = ObliviousTransform(config)
        if args.audit is not None:
            return _audit(transform, args.audit)
        result = transform(args.prompt)
    except ObliviousError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.public_summary(), indent=2, ensure_ascii=False))
    if result.device_only or not result.protected:
        print(f"note: {result.message}", file=sys.stderr)
    for line in result.warnings:
        print(f"warning: {line}", file=sys.stderr)
    return 0


def _audit(transform: ObliviousTransform, path: str) -> int:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ObliviousError(f"cannot read {path!r}: {exc.strerror or exc}") from exc
    for line in text.splitlines():
        if line.strip():
            print(json.dumps(transform.audit(line), ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
