"""Measure sample quality with the project's own digit classifier.

The program is ``diffusion_jax/commands/evaluate.py`` (installed as ``diffusion-evaluate`` too);
``python evaluate.py --help`` lists its flags.
"""

# (a light import: the package imports jax lazily, so Ctrl-C is handled from the start)
from diffusion_jax.commands.evaluate import main, run  # noqa: F401  (main: for `import evaluate`)

if __name__ == "__main__":
    run("evaluate.py")
