"""Sample from a trained checkpoint: a class-ordered grid, a GIF of the reverse chain, an .npz.

The program is ``diffusion_jax/commands/sample.py`` (installed as ``diffusion-sample`` too);
``python sample.py --help`` lists its flags.
"""

# (a light import: the package imports jax lazily, so Ctrl-C is handled from the start)
from diffusion_jax.commands.sample import main, run  # noqa: F401  (main: for `import sample`)

if __name__ == "__main__":
    run("sample.py")
