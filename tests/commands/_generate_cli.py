"""``rehyat generate`` at the command tests' tiny size (9 frames of 32x32, 2 steps, guidance 2)."""

from __future__ import annotations

from rehyat.cli import main


def gen(model, out, *extra):
    """Run ``rehyat generate --model MODEL --out OUT`` with the tests' geometry and ``extra`` arguments; the exit code."""
    return main(["generate", "--model", str(model), "--frames", "9", "--height", "32", "--width", "32",
                 "--steps", "2", "--guidance", "2.0", "--out", str(out), *extra])
