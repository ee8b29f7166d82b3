"""Copy a trained model directory into the package as the bundled teacher, weights in bfloat16.

bfloat16 halves the size shipped in the repository; `hpd.models.loading.load_model` loads it back as
float32 (the accuracy in the README is measured on the exported copy).

    python scripts/export_teacher.py runs/teacher/final hpd/assets/teacher
"""

from __future__ import annotations

import sys

from hpd.models.loading import load_model, save_model


def main(src: str, dst: str) -> None:
    model, tokenizer = load_model(src)
    save_model(model, tokenizer, dst, dtype="bf16")
    print(f"exported {src} -> {dst} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, bfloat16)")


if __name__ == "__main__":
    main(*sys.argv[1:3])
