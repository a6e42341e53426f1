"""Distil a trained guided model into a few-step sampler (guided progressive distillation).

The program is ``diffusion_jax/commands/distill.py`` (installed as ``diffusion-distill`` too);
``python distill.py --help`` lists its flags.
"""

# (a light import: the package imports jax lazily, so Ctrl-C is handled from the start)
from diffusion_jax.commands.distill import main, run  # noqa: F401  (main: for `import distill`)

if __name__ == "__main__":
    run("distill.py")
