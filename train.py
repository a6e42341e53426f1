"""Train (or resume) a guided diffusion model.

The program is ``diffusion_jax/commands/train.py`` (installed as ``diffusion-train`` too);
``python train.py --help`` lists its flags.
"""

# (a light import: the package imports jax lazily, so Ctrl-C is handled from the start)
from diffusion_jax.commands.train import main, run  # noqa: F401  (main: for `import train`)

if __name__ == "__main__":
    run("train.py")
